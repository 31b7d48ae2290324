"""The 4-bit model, its reference, and the log-prob path, on real bitsandbytes/PEFT (CPU)."""

import bitsandbytes as bnb
import pytest
import torch
from conftest import OpCounter
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from lowrank_pref.config import build_config
from lowrank_pref.data import collate, ensure_chat_template, prepare
from lowrank_pref.logps import sequence_logps
from lowrank_pref.model import load_model, load_tokenizer, reference_mode, save_adapter


def _cfg(model_dir, **kw):
    overrides = {"model": str(model_dir), "lora.dropout": "0.0", "gradient_checkpointing": "false"}
    overrides.update(kw)
    return build_config("tiny", overrides=overrides)


def _batch(tokenizer, n=3):
    ensure_chat_template(tokenizer)
    rows = [{"prompt": f"Tell me about item {i}.", "chosen": f"Item {i} is lovely, thank you.",
             "rejected": "No." * (i + 1)} for i in range(n)]
    pairs, _, _ = prepare(rows, tokenizer, source="t", columns={}, max_length=64, max_prompt_length=32)
    return collate(pairs, tokenizer.pad_token_id)


def _direct_logps(model, batch):
    """Textbook computation: full logits, log_softmax, gather the next token, sum over answer tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
    return (logp * batch["completion_mask"][:, 1:]).sum(1)


def _randomize_lora(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)


def _model_with_random_lora(model_dir):
    """Our 4-bit PeftModel with non-zero LoRA weights, so policy and reference differ."""
    cfg = _cfg(model_dir)
    tok = load_tokenizer(cfg)
    model, _ = load_model(cfg, tok)
    _randomize_lora(model)
    return cfg, tok, model


def test_model_is_4bit_nf4_double_quant_with_lora(tiny_model_dir):
    cfg = _cfg(tiny_model_dir)
    tok = load_tokenizer(cfg)
    model, reference = load_model(cfg, tok)
    assert reference == "base"
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears, "base linears must be 4-bit"
    qs = linears[0].weight.quant_state
    assert qs.quant_type == "nf4" and qs.nested  # nested = double quantization
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_sequence_logps_equal_direct_computation(tiny_model_dir, tokenizer):
    cfg, tok, model = _model_with_random_lora(tiny_model_dir)
    batch = _batch(tok)
    model.eval()
    with torch.no_grad():
        ours, lengths = sequence_logps(model, batch, chunk_size=5)  # small chunks: many chunk boundaries
        direct = _direct_logps(model, batch)
    assert torch.allclose(ours, direct, atol=1e-4), (ours, direct)
    assert lengths.tolist() == batch["completion_mask"].sum(1).float().tolist()


def test_reference_is_the_base_model(tiny_model_dir, tokenizer):
    cfg, tok, model = _model_with_random_lora(tiny_model_dir)
    batch = _batch(tok)
    model.train()
    with reference_mode(model):
        ref, _ = sequence_logps(model, batch)
    assert model.training  # reference_mode restores the mode it found
    model.eval()
    with torch.no_grad():
        policy, _ = sequence_logps(model, batch)
    # a separately loaded 4-bit base without any adapter gives the same numbers as adapters-off
    from lowrank_pref.model import load_base

    plain = load_base(cfg, tok, for_training=False)
    with torch.no_grad():
        base = _direct_logps(plain, batch)
    assert torch.allclose(ref, base, atol=1e-4)
    assert not torch.allclose(policy, ref, atol=1e-2)


def test_4bit_backward_matches_dense_twin(tiny_model_dir, tokenizer):
    """bitsandbytes' CPU 4-bit kernel warns that it has no autograd kernel; its input gradient must still be right."""
    cfg = _cfg(tiny_model_dir)
    tok = load_tokenizer(cfg)
    q, _ = load_model(cfg, tok)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    modules = dict(dense.named_modules())
    for name, mod in q.get_base_model().named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
            modules[name.replace(".base_layer", "")].weight.data.copy_(w)
    dense = get_peft_model(dense, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules="all-linear"))
    _randomize_lora(q)
    dense.load_state_dict({k: v for k, v in q.state_dict().items() if "lora_" in k}, strict=False)
    batch = _batch(tok)
    grads = []
    for m in (q, dense):
        m.train()
        m.zero_grad()
        logps, _ = sequence_logps(m, batch)
        logps.sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    for name, g in grads[1].items():
        rel = (grads[0][name] - g).norm() / g.norm().clamp(min=1e-12)
        assert rel < 0.05, (name, float(rel))


def test_starting_adapter_is_the_frozen_reference(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir)
    tok = load_tokenizer(cfg)
    sft, _ = load_model(cfg, tok)
    _randomize_lora(sft)
    save_adapter(sft, tok, tmp_path / "sft")
    cfg2 = _cfg(tiny_model_dir, adapter=str(tmp_path / "sft"))
    model, reference = load_model(cfg2, tok)
    assert reference == "adapter"
    batch = _batch(tok)
    with reference_mode(model):
        ref, _ = sequence_logps(model, batch)
    with torch.no_grad(), model.disable_adapter():
        bare, _ = sequence_logps(model, batch)
    model.eval()
    with torch.no_grad():
        policy, _ = sequence_logps(model, batch)
    assert torch.allclose(ref, policy, atol=1e-4)  # the policy starts from the adapter...
    assert not torch.allclose(ref, bare, atol=1e-2)  # ...and the reference is that adapter, not the bare base
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".reference." in n}
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if ".reference." in n)
    # one optimizer step on the policy leaves the reference adapter untouched
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    logps, _ = sequence_logps(model, batch)
    logps.sum().backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])
    with reference_mode(model):
        ref_after, _ = sequence_logps(model, batch)
    assert torch.allclose(ref, ref_after, atol=1e-6)


def test_saved_adapter_reloads_with_peft_alone(tiny_model_dir, tmp_path):
    cfg, tok, model = _model_with_random_lora(tiny_model_dir)
    save_adapter(model, tok, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    batch = _batch(tok)
    model.eval()
    with torch.no_grad():
        ours, _ = sequence_logps(model, batch)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "a").eval()
    with torch.no_grad():
        theirs = _direct_logps(reloaded, batch)
    # plain fp32 base vs the 4-bit one we trained on: close, not equal (quantization error)
    assert torch.allclose(ours, theirs, rtol=0.05)


def test_export_merge_matches_the_trained_model(tiny_model_dir, tmp_path):
    from lowrank_pref.export import merge

    cfg, tok, model = _model_with_random_lora(tiny_model_dir)
    save_adapter(model, tok, tmp_path / "a")
    batch = _batch(tok)
    model.eval()
    with torch.no_grad():
        ours, _ = sequence_logps(model, batch)
    out = merge(tmp_path / "a", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert next(merged.parameters()).dtype == torch.float32  # loaded as fp32; saved as fp16 below
    import json

    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    with torch.no_grad():
        theirs = _direct_logps(merged, batch)
    # de-quantized base + folded adapter, stored in fp16: the trained model's numbers up to fp16 rounding
    assert torch.allclose(ours, theirs, rtol=5e-3), (ours, theirs)


def test_prequantized_checkpoint_trains_as_it_is(tiny_model_dir, tokenizer, tmp_path, recwarn):
    """A model uploaded already in 4-bit (unsloth's "...-bnb-4bit" repos) loads as it is: the same NF4 weights as
    quantizing its original at load, so the same reference log-probs, computed in the run's dtype rather than the one
    it was saved with, and no second quantization asked for. Another quantization is refused naming the key; export
    merges into its de-quantized weights and refuses --from-original, which has no original weights to use."""
    from lowrank_pref.config import ConfigError
    from lowrank_pref.export import ExportError, merge
    from lowrank_pref.model import nf4_config

    stored = tmp_path / "bnb-4bit"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=nf4_config(torch.bfloat16),
                                         dtype=torch.float32, device_map={"": "cpu"}).save_pretrained(stored)
    tokenizer.save_pretrained(stored)
    batch = _batch(tokenizer)
    logps = []
    for model_dir in (tiny_model_dir, stored):
        cfg = _cfg(model_dir)
        model, _ = load_model(cfg, load_tokenizer(cfg))
        assert {m.compute_dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)} == {torch.float32}
        with torch.no_grad(), reference_mode(model):
            logps.append(sequence_logps(model, batch)[0])
    assert torch.equal(logps[0], logps[1])
    assert not [w for w in recwarn if "quantization_config" in str(w.message)]
    with pytest.raises(ConfigError, match="stored in 4bit.*quantization=none.*set quantization=4bit"):
        load_model(_cfg(stored, quantization="none"), tokenizer)
    save_adapter(model, tokenizer, tmp_path / "a")
    merged = merge(tmp_path / "a", tmp_path / "merged")
    assert "quantization_config" not in (merged / "config.json").read_text()
    with pytest.raises(ExportError, match="stored in 4bit.*without --from-original"):
        merge(tmp_path / "a", tmp_path / "merged2", from_original=True)


def test_export_push_calls_the_hub_with_the_adapter(tiny_model_dir, tmp_path):
    from lowrank_pref.export import ExportError, push

    cfg = _cfg(tiny_model_dir)
    tok = load_tokenizer(cfg)
    model, _ = load_model(cfg, tok)
    save_adapter(model, tok, tmp_path / "a")

    class RecordingApi:  # stands in for the network, not for any ML library
        calls = []

        def create_repo(self, **kw):
            self.calls.append(("create_repo", kw))
            return f"https://huggingface.co/{kw['repo_id']}"

        def upload_folder(self, **kw):
            self.calls.append(("upload_folder", kw))

    api = RecordingApi()
    url = push(tmp_path / "a", "me/my-adapter", api=api)
    assert url.endswith("me/my-adapter")
    assert api.calls[0][1]["private"] is True
    assert api.calls[1][1]["folder_path"] == str(tmp_path / "a")
    with pytest.raises(ExportError, match="must look like 'user/name'"):
        push(tmp_path / "a", "noslash", api=api)


def _logps_and_grads(model, batch):
    model.zero_grad()
    counter = OpCounter()
    with counter:
        logps, _ = sequence_logps(model, batch)
    logps.sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, counter.counts


@pytest.mark.parametrize("dora", [False, True])
def test_fused_lora_add_equals_peft_forward(tiny_model_dir, tokenizer, dora):
    """Our fused LoRA forward (the branch added into the base output in place) gives PEFT's numbers and gradients;
    DoRA keeps PEFT's own forward."""
    from lowrank_pref.patches import fuse_lora_adds

    cfg = _cfg(tiny_model_dir, **{"lora.use_dora": str(dora).lower()})
    tok = load_tokenizer(cfg)
    model, _ = load_model(cfg, tok)
    _randomize_lora(model)
    model.train()
    batch = _batch(tok)
    lora_layers = [m for m in model.modules() if "forward" in vars(m) and hasattr(m, "lora_A")]
    assert len(lora_layers) == 2 * 7  # every targeted linear of both layers got the fused forward
    fused, fused_grads, ops = _logps_and_grads(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes: bf16 LoRA on fp32 and on bf16 base outputs
        fused_autocast, _, autocast_ops = _logps_and_grads(model, batch)
    for m in lora_layers:
        del m.forward  # PEFT's forward again
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_autocast, _, peft_autocast_ops = _logps_and_grads(model, batch)
    # bf16 layers round twice (branch, scaled add) where PEFT rounds three times: equal to bf16's precision
    assert torch.allclose(fused_autocast, peft_autocast, rtol=1e-3), (fused_autocast, peft_autocast)
    # in place under autocast too, as on a GPU, where the 4-bit layers return fp32 and the branches bf16
    assert peft_autocast_ops["clone"] - autocast_ops["clone"] == (0 if dora else len(lora_layers))
    assert dora or autocast_ops.get("add_", 0) == len(lora_layers)
    peft, peft_grads, peft_ops = _logps_and_grads(model, batch)
    # PEFT clones each base output; the fused path ran in every layer (for DoRA, in none)
    assert peft_ops["clone"] - ops["clone"] == (0 if dora else len(lora_layers)), (peft_ops["clone"], ops["clone"])
    assert torch.allclose(fused, peft, atol=1e-5), (fused, peft)
    for name, g in peft_grads.items():
        assert torch.allclose(fused_grads[name], g, atol=1e-6, rtol=1e-4), name
    assert fuse_lora_adds(model) == len(lora_layers) and fuse_lora_adds(model) == 0  # once per layer
    with reference_mode(model):  # adapters off: the base layer alone, through PEFT's forward
        counter = OpCounter()
        with counter:
            sequence_logps(model, batch)
        assert counter.counts.get("add_", 0) == 0  # nothing added in place: no LoRA branch


def test_last_layer_is_not_checkpointed(tiny_model_dir, tokenizer):
    """Checkpointing covers every decoder layer but the last one, whose recompute would start backward anyway, and
    leaves the embeddings' output without grad (so backward stops at the first layer's LoRA weights, not below);
    the recompute skips each layer's last 4-bit matmul; a plan (memory.choose_plan) can name how many of the first
    layers to checkpoint; the gradients are those of no checkpointing."""
    from lowrank_pref.memory import MemoryPlan

    grads = []
    for checkpointing, plan, flags in (("true", None, [True, False]), ("auto", MemoryPlan(2, 2), [True, True]),
                                       ("false", None, [False, False])):
        cfg = _cfg(tiny_model_dir, gradient_checkpointing=checkpointing)
        tok = load_tokenizer(cfg)
        torch.manual_seed(0)  # the same LoRA A init each time, whatever ran before
        model, _ = load_model(cfg, tok, plan)
        _randomize_lora(model)
        layers = model.get_base_model().model.layers
        assert [layer.gradient_checkpointing for layer in layers] == flags
        model.train()
        embedded, runs = [], []
        model.get_base_model().get_input_embeddings().register_forward_hook(
            lambda m, i, out: embedded.append(out.requires_grad))
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.register_forward_pre_hook(lambda m, i, name=name: runs.append(
                    name.split("layers.")[1].removesuffix(".base_layer")))
        grads.append(_logps_and_grads(model, _batch(tok))[1])
        assert embedded == [False]
        # backward recomputes each checkpointed layer's 4-bit linears but its last one: the down projection's
        # output is only added to the residual, and the fused LoRA forward runs its base matmul after every op
        # that saves for backward, so the recompute stops before it
        recomputed = sorted({n for n in runs if runs.count(n) == 2})
        assert len(runs) == 7 * len(layers) + len(recomputed)
        assert recomputed == sorted(f"{i}.{m}" for i, on in enumerate(flags) if on for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj")), recomputed
        first = [g for n, g in grads[-1].items() if "layers.0." in n and "lora_A" in n]
        assert first and all(g.abs().sum() > 0 for g in first)  # the first layer's adapters still learn
    for name, g in grads[-1].items():
        for checkpointed in grads[:-1]:
            assert torch.allclose(checkpointed[name], g, atol=1e-6, rtol=1e-4), name


def test_16bit_embedding_tables_give_the_same_numbers(tiny_model_dir, tokenizer):
    """On a GPU, under autocast, the input embeddings and LM head stay in their 16-bit load dtype instead of
    prepare_model_for_kbit_training's fp32 copies (model.embeddings_in): half the memory, the same numbers. CPU
    autocast casts the same way CUDA's does, so the claim is checked here with it."""
    from lowrank_pref.logps import selected_token_logps
    from lowrank_pref.model import load_base
    from lowrank_pref.patches import embeddings_in

    cfg = _cfg(tiny_model_dir, dtype="bf16")
    base = load_base(cfg, load_tokenizer(cfg))
    embeddings, head = base.get_input_embeddings(), base.get_output_embeddings()
    assert embeddings.weight.dtype == head.weight.dtype == torch.float32  # PEFT's upcast
    ids = torch.randint(0, embeddings.weight.shape[0], (3, 7))
    torch.manual_seed(0)
    hidden = torch.randn(9, head.weight.shape[1])
    targets = torch.randint(0, head.weight.shape[0], (9,))
    before = embeddings(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps_before = selected_token_logps(hidden, head.weight, targets, chunk_size=4)
    saved = embeddings_in(base, torch.bfloat16)
    assert embeddings.weight.dtype == head.weight.dtype == torch.bfloat16
    assert saved == 2 * (embeddings.weight.numel() + head.weight.numel()) > 0
    after = embeddings(ids)
    assert after.dtype == torch.float32 and torch.equal(after, before)  # the residual stream starts in fp32, as before
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(selected_token_logps(hidden, head.weight, targets, chunk_size=4), logps_before)
    assert embeddings_in(base, torch.bfloat16) == 0  # once


def test_16bit_tables_only_for_plain_modules():
    """Gemma 3's embeddings scale their output in the weight's dtype, so in 16 bits they would not give the same
    numbers: they (and the LM head tied to them) stay fp32. A Llama's plain tables, untied, both go to 16 bits."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    from lowrank_pref.patches import embeddings_in

    small = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(head_dim=32, **small)).requires_grad_(False)
    assert gemma.get_output_embeddings().weight is gemma.get_input_embeddings().weight
    assert embeddings_in(gemma, torch.bfloat16) == 0
    assert gemma.get_input_embeddings().weight.dtype == torch.float32
    llama = LlamaForCausalLM(LlamaConfig(**small)).requires_grad_(False)
    assert embeddings_in(llama, torch.bfloat16) == 2 * 2 * 128 * 64
    assert llama.get_input_embeddings().weight.dtype == llama.get_output_embeddings().weight.dtype == torch.bfloat16
