"""Regenerate lowrank_pref/assets/tiny_prefs.jsonl, the small preference set the offline `tiny` preset trains on.

    python tools/make_tiny_prefs.py

The task is one a toy model can learn in a minute and a person can see: for a how-to question, the chosen answer
is kind and on topic, the rejected one is curt, dismissive or off topic. Deterministic (seeded), so the file in
the repo is exactly what this prints.
"""

import json
import random
from pathlib import Path

TOPICS = [
    ("boil an egg", "put the egg in boiling water for nine minutes, then cool it in cold water"),
    ("water a cactus", "water it deeply once every two weeks and let the soil dry in between"),
    ("tie a tie", "cross the wide end over, loop it up through the neck and pull it through the knot"),
    ("make tea", "pour hot water over the leaves and let them steep for three minutes"),
    ("fix a flat tyre", "find the hole, patch it or fit a new tube, then pump the tyre up"),
    ("learn to swim", "start in shallow water with a teacher and practise floating first"),
    ("save money", "write down what you spend and put a little aside every payday"),
    ("sleep better", "go to bed at the same time and keep screens out of the bedroom"),
    ("bake bread", "mix flour, water, salt and yeast, let it rise, then bake it hot"),
    ("clean a window", "wipe it with warm soapy water and dry it with a soft cloth"),
    ("plant a tree", "dig a wide hole, set the roots level with the ground and water well"),
    ("start running", "begin with short easy runs and add a little distance each week"),
    ("write a letter", "greet the reader, say what you need clearly and sign your name"),
    ("cook rice", "rinse the rice, add twice as much water and simmer it covered"),
    ("paint a wall", "clean the wall, tape the edges and roll on two thin coats"),
    ("study for a test", "review a little each day and test yourself on what you read"),
    ("change a light bulb", "turn the power off, let the bulb cool and twist in a new one"),
    ("make a budget", "list your income and costs and set a limit for each part"),
    ("care for a cat", "give it fresh food and water and a clean litter box every day"),
    ("learn a language", "practise a few words every day and speak with others often"),
    ("wash a car", "rinse it, wash it with soapy water from the top and dry it"),
    ("grow tomatoes", "plant them in sun, water them often and tie them to a stake"),
    ("iron a shirt", "start with the collar, then the cuffs, sleeves and the body"),
    ("make a salad", "wash the leaves, cut the vegetables and add a simple dressing"),
    ("stop a cough", "drink warm water with honey and rest your voice"),
    ("fold a map", "fold it along the old creases, first one way, then the other"),
    ("light a campfire", "build a small pile of dry twigs, light it and add wood slowly"),
    ("sharpen a knife", "draw the blade across a whetstone at a steady small angle"),
    ("pack a suitcase", "roll your clothes and put the heavy things at the bottom"),
    ("read faster", "read in phrases rather than single words and avoid rereading"),
    ("keep plants alive", "give them the right light and water only when the soil is dry"),
    ("make coffee", "grind the beans, add hot water and let it brew for four minutes"),
    ("clean an oven", "spread a baking soda paste inside, wait overnight and wipe it off"),
    ("remember names", "repeat the name when you hear it and link it to a picture"),
    ("calm down", "breathe slowly in and out and count to ten"),
    ("walk a dog", "use a short lead, bring bags and let it sniff along the way"),
    ("build a shelf", "mark the wall, fix two brackets level and screw the board on"),
    ("make pancakes", "whisk flour, milk and eggs and fry thin rounds in a hot pan"),
    ("wake up early", "move your alarm a little earlier each day and get morning light"),
    ("draw a face", "sketch an oval, mark the eye line halfway and add the features"),
    ("play chess", "learn how each piece moves and control the centre of the board"),
    ("write a poem", "pick one feeling, find a picture for it and keep the lines short"),
    ("fix a leaky tap", "turn off the water, open the tap and replace the worn washer"),
    ("stay focused", "work in short blocks and put your phone in another room"),
    ("make soup", "soften onions, add vegetables and stock and simmer until tender"),
    ("clean shoes", "brush off the dirt, wipe them and let them dry slowly"),
    ("find a job", "write a clear short CV and apply to a few roles every week"),
    ("keep bees", "start with one hive, learn from a local club and check it weekly"),
]

ASK = ["How do I {t}?", "Can you tell me how to {t}?", "What is the best way to {t}?", "Please explain how to {t}.",
       "I want to {t}. Where do I start?", "Any tips to {t}?"]
GOOD_OPEN = ["Sure, happy to help!", "Of course!", "Good question!", "Glad you asked!", "Happy to help!"]
GOOD_CLOSE = ["I hope this helps.", "Good luck, you can do it.", "Let me know if you have more questions.",
              "Have fun with it!", "Take your time and enjoy it."]
BAD = ["No. Figure it out yourself.", "Why would I know that? Ask someone else.", "That is a silly question.",
       "I do not care about that.", "Just search for it, I am busy.", "Whatever. It does not matter.",
       "Not my problem.", "Stop asking me things like this."]


def main() -> None:
    rng = random.Random(1234)
    rows = []
    for topic, how in TOPICS:
        for ask in rng.sample(ASK, 5):
            good = f"{rng.choice(GOOD_OPEN)} To {topic}, {how}. {rng.choice(GOOD_CLOSE)}"
            rows.append({"prompt": [{"role": "user", "content": ask.format(t=topic)}],
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": rng.choice(BAD)}]})
    rng.shuffle(rows)
    out = Path(__file__).resolve().parent.parent / "lowrank_pref" / "assets" / "tiny_prefs.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} pairs to {out}")


if __name__ == "__main__":
    main()
