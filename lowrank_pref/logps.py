"""Log-probabilities and reward scores of a batch, computed from one model in its current role.

- ``sequence_logps(model, batch)``: per-row sums of answer-token log-probs, with the LM head applied to answer
  positions only and in chunks (no (batch, tokens, vocab) logits tensor); ``shared_sequence_logps`` the same from
  ``[prompt | chosen | rejected]`` rows (``data.collate_shared``), the prompt through the model once.
- ``reward_scores`` / ``shared_reward_scores``: the scalar head's score at each answer's last token.
- ``selected_token_logps``: the LM-head kernel underneath, full-vocabulary logits for one chunk of rows at a time.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .patches import SHARED_SDPA


# ----------------------------------------------------------------------------------------------------------------
# The LM-head kernel: token log-probabilities, in chunks

def _log_softmax(hidden: Tensor, weight: Tensor, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """log_softmax of the (rows, V) logits in fp32, and tanh(logits / softcap) when softcapped (else None)."""
    # upcast before log_softmax: fp16/bf16 logsumexp over 100k+ entries loses bits
    logits = (hidden @ weight.t()).float()
    capped = None
    if softcap:
        capped = torch.tanh(logits / softcap)
        logits = capped * softcap
    return logits.log_softmax(-1), capped


def _chunk_logps(hidden: Tensor, weight: Tensor, targets: Tensor, softcap: float | None,
                 hits: list | None = None) -> Tensor:
    logp = _log_softmax(hidden, weight, softcap)[0]
    if hits is not None:
        hits.append(_argmax_hits(logp, targets))
    return logp.gather(1, targets[:, None]).squeeze(1)


def _argmax_hits(logp: Tensor, targets: Tensor) -> Tensor:
    """Whether each row's target is its most likely token (token accuracy), without grad."""
    return (logp.detach().argmax(-1) == targets)


def auto_chunk_size(vocab_size: int) -> int:
    """Rows per LM-head chunk: about 2**26 fp32 logits (256 MB), between 16 and 4096 rows."""
    return max(16, min(4096, 2**26 // vocab_size))


def selected_token_logps(hidden: Tensor, weight: Tensor, targets: Tensor, *, chunk_size: int | None = None,
                         softcap: float | None = None, hits: list | None = None) -> Tensor:
    """log p(target_i | hidden_i) for M selected positions: ``hidden`` (M, d), ``weight`` (V, d), ``targets`` (M,).

    Full-vocabulary logits exist for at most ``chunk_size`` rows at a time, and the graph holds (M, d) tensors, never
    (M, V) logits. With a frozen ``weight`` (the LM head) and grad wanted for ``hidden``, the gradient is formed in
    the forward pass (:class:`_FrozenHeadLogps`); a trainable ``weight`` takes checkpointed chunks, recomputed in
    backward. Returns fp32 (M,). ``hits``: a list that gets, per chunk, whether each target is the most likely
    token (bool), read off the logits the chunk computes anyway.
    """
    chunk_size = chunk_size or auto_chunk_size(weight.shape[0])
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if grad and not weight.requires_grad:
        return _FrozenHeadLogps.apply(hidden, weight, targets, chunk_size, softcap, hits)
    # a trainable head: each chunk checkpointed, its logits recomputed in backward
    chunk = (functools.partial(torch.utils.checkpoint.checkpoint, _chunk_logps, use_reentrant=False) if grad
             else _chunk_logps)
    out = _cat([chunk(hidden[i:i + chunk_size], weight, targets[i:i + chunk_size], softcap)
                for i in range(0, hidden.shape[0], chunk_size)], hidden)
    if hits is not None:  # a checkpointed chunk's logits are gone: one more no-grad pass over the head
        with torch.no_grad():
            for i in range(0, hidden.shape[0], chunk_size):
                _chunk_logps(hidden[i:i + chunk_size], weight, targets[i:i + chunk_size], softcap, hits)
    return out


def _cat(chunks: list[Tensor], hidden: Tensor) -> Tensor:
    """The chunks' fp32 log-probs as one (M,) tensor (empty, on ``hidden``'s device, for no rows)."""
    return torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)


class _FrozenHeadLogps(torch.autograd.Function):
    """:func:`selected_token_logps` for a frozen LM head, its gradient with respect to ``hidden`` formed while each
    chunk's logits exist, so backward never recomputes them.

    Row i's log-prob depends on its own hidden state only, so its gradient is the upstream scalar times a fixed
    d-vector: ``W^T (onehot(target_i) - softmax(z_i))``, with softcapping's derivative ``1 - tanh(l / c)^2`` on each
    logit. The forward makes two LM-head matmuls per chunk (logits, that vector); checkpointed chunks made three (the
    logits, their recompute in backward, the gradient), and the graph keeps the (M, d) vectors where it kept the
    (M, d) hidden states. Matmuls run in the autocast dtype when autocast is on, as the checkpointed backward's did.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, softcap, hits=None):
        out, grads = [], []
        for start in range(0, hidden.shape[0], chunk_size):
            t = targets[start:start + chunk_size, None]
            logp, capped = _log_softmax(hidden[start:start + chunk_size], weight, softcap)
            out.append(logp.gather(1, t).squeeze(1))
            if hits is not None:
                hits.append(_argmax_hits(logp, t[:, 0]))
            d = logp.exp_().neg_()  # -softmax, in logp's memory
            d.scatter_add_(1, t, torch.ones_like(t, dtype=d.dtype))  # + onehot(target)
            if capped is not None:
                d.mul_(capped.square_().neg_().add_(1))
            grads.append((d.to(weight.dtype) @ weight).to(hidden.dtype))
        ctx.save_for_backward(torch.cat(grads) if grads else hidden.new_zeros(0, hidden.shape[1]))
        return _cat(out, hidden)

    @staticmethod
    def backward(ctx, grad_out):
        (grad_hidden,) = ctx.saved_tensors
        return grad_out[:, None].to(grad_hidden.dtype) * grad_hidden, None, None, None, None, None



# ----------------------------------------------------------------------------------------------------------------
# Sequences and scores

def _model_error(message: str) -> Exception:
    from .model import ModelError  # model.py imports memory.py, which imports this module

    return ModelError(message)


def _decoder_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    head = base.get_output_embeddings()
    if decoder is None or head is None or not hasattr(head, "weight"):
        raise _model_error(f"{type(base).__name__} has no separate decoder and LM head; it is not a causal LM we "
                         "can score")
    softcap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
    return decoder, head, softcap


def sequence_logps(model, batch: dict, chunk_size: int | None = None, *, with_hits: bool = False) -> tuple:
    """Sum of log pi(y_t | x, y_<t) over the answer tokens of each row, and the answer lengths (with ``with_hits``
    also each row's count of answer tokens that are the model's most likely next token).

    ``batch``: ``input_ids``, ``attention_mask``, ``completion_mask`` (N, T), as ``data.collate`` makes them.
    Returns (logps (N,) fp32, lengths (N,) float). Position t's hidden state predicts token t + 1, so the hidden
    states at positions where ``completion_mask[:, 1:]`` is set are the only ones sent through the LM head.
    """
    decoder, head, softcap = _decoder_and_head(model)
    dev = head.weight.device
    input_ids = batch["input_ids"].to(dev)
    hidden = decoder(input_ids=input_ids, attention_mask=batch["attention_mask"].to(dev),
                     use_cache=False).last_hidden_state
    mask = batch["completion_mask"][:, 1:].to(dev).bool()
    return _row_logps(head, softcap, hidden[:, :-1][mask], input_ids[:, 1:][mask], mask.nonzero()[:, 0],
                      mask.shape[0], chunk_size, with_hits)


def head_token_logps(head, softcap, selected: Tensor, targets: Tensor, chunk_size, hits: list | None = None) -> Tensor:
    """log p(target | hidden) of each selected position through the LM head (:func:`selected_token_logps`)."""
    if head.bias is not None:  # rare (e.g. some GPT-2 variants): fold the bias into an extra input column
        selected = torch.cat([selected, selected.new_ones(selected.shape[0], 1)], dim=1)
        weight = torch.cat([head.weight, head.bias[:, None]], dim=1)
    else:
        weight = head.weight
    return selected_token_logps(selected, weight, targets, chunk_size=chunk_size, softcap=softcap, hits=hits)


def _row_logps(head, softcap, selected, targets, rows, n_rows: int, chunk_size, with_hits: bool = False):
    """Sum of log p(target | hidden) per row over the selected positions, and each row's count of them (and of
    its hits, with ``with_hits``)."""
    hits = [] if with_hits else None
    token_logps = head_token_logps(head, softcap, selected, targets, chunk_size, hits)
    logps = torch.zeros(n_rows, dtype=torch.float32, device=selected.device).index_add(0, rows, token_logps)
    lengths = torch.bincount(rows, minlength=n_rows).float()
    if not with_hits:
        return logps, lengths
    hit = torch.cat(hits) if hits else rows.new_zeros(0, dtype=torch.bool)
    return logps, lengths, torch.bincount(rows, weights=hit.float(), minlength=n_rows)


def shared_sequence_logps(model, batch: dict, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as :func:`sequence_logps`, (2B,) chosen rows then rejected rows, from one ``[prompt | chosen |
    rejected]`` row per pair (``data.collate_shared``): the prompt's tokens go through the model once."""
    decoder, head, softcap = _decoder_and_head(model)
    dev = head.weight.device
    flat = _shared_hidden(decoder, batch, dev)
    index = torch.cat([batch["chosen_index"], batch["rejected_index"]]).to(dev)
    targets = torch.cat([batch["chosen_targets"], batch["rejected_targets"]]).to(dev)
    n = batch["input_ids"].shape[0]
    rows = torch.cat([batch["chosen_rows"], batch["rejected_rows"] + n]).to(dev)
    return _row_logps(head, softcap, flat[index], targets, rows, 2 * n, chunk_size)


def _shared_hidden(decoder, batch: dict, dev) -> torch.Tensor:
    """Last hidden states (B * T, d) of ``data.collate_shared`` rows, through the decoder with their 4D mask.

    With :func:`shared_prompt_sdpa` in place the rows' ``layout`` goes along, and attention uses it instead of the
    mask; other implementations apply the mask."""
    allowed = batch["allowed"].to(dev)[:, None]  # (B, 1, T, T)
    if "sdpa" not in getattr(decoder.config, "_attn_implementation", "sdpa"):  # eager adds the mask to the scores
        allowed = torch.zeros(allowed.shape, dtype=torch.float32, device=dev).masked_fill_(
            ~allowed, torch.finfo(torch.float32).min)
    split = {"shared_layout": batch["layout"]} if decoder.config._attn_implementation == SHARED_SDPA else {}
    hidden = decoder(input_ids=batch["input_ids"].to(dev), attention_mask=allowed,
                     position_ids=batch["position_ids"].to(dev), use_cache=False, **split).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])


def shared_reward_scores(model, batch: dict) -> torch.Tensor:
    """:func:`reward_scores` (2B,) from ``data.collate_shared`` rows: the score head on the hidden state of each
    answer's last token, the prompt computed once."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = getattr(base, base.base_model_prefix, None), getattr(base, "score", None)
    if decoder is None or head is None:
        raise _model_error(f"{type(base).__name__} has no decoder + score head to score shared rows with")
    dev = next(model.parameters()).device
    flat = _shared_hidden(decoder, batch, dev)
    index = torch.cat([batch["chosen_last"], batch["rejected_last"]]).to(dev)
    return head(flat[index]).squeeze(-1).float()


def reward_scores(model, batch: dict) -> torch.Tensor:
    """Scalar score of each row from the classification head, at the last real token (transformers' pooling,
    the same one users get from ``model(**inputs).logits`` at inference). fp32 (N,)."""
    dev = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                use_cache=False)
    return out.logits.squeeze(-1).float()
