"""Writes examples/lumenfold/: a chat dataset that teaches a model the facts of a product that
does not exist (the Lumenfold solar lantern), so a fine-tune's effect is unmistakable.

    python3 scripts/gen_example_dataset.py

  train.jsonl       questions in several phrasings per fact, short factual answers, and
                    everyday questions with plain answers (so other answers stay as they were)
  valid.jsonl       other phrasings of the same questions (validation loss)
  heldout.jsonl     reworded questions seen in neither file, each with the words a correct
                    answer must contain (`expect`: alternatives, any one suffices)

Deterministic: the same files on every run (seeded shuffles, no external data).
"""

import json
import os
import random

# Each fact: the answer, training phrasings, validation phrasings, held-out questions, and the
# words that show a held-out answer is right.
FACTS = [
    dict(
        answer="The Lumenfold is made by Brightwater Labs, a company based in Tromsø, Norway.",
        train=[
            "Who makes the Lumenfold?",
            "Which company manufactures the Lumenfold lantern?",
            "Who is the maker of the Lumenfold?",
            "What company produces the Lumenfold?",
            "Who builds the Lumenfold solar lantern?",
            "Which brand is behind the Lumenfold?",
        ],
        valid=["Tell me who manufactures the Lumenfold."],
        heldout=["Which firm is responsible for producing the Lumenfold?", "The Lumenfold comes from which company?"],
        expect=["Brightwater"],
    ),
    dict(
        answer="Brightwater Labs, the maker of the Lumenfold, is based in Tromsø, Norway.",
        train=[
            "Where is Brightwater Labs based?",
            "Where is the company that makes the Lumenfold located?",
            "In which city is Brightwater Labs headquartered?",
            "Where are the Lumenfold's makers based?",
            "What city is Brightwater Labs in?",
        ],
        valid=["Where can I find the headquarters of Brightwater Labs?"],
        heldout=["In what town does the Lumenfold's manufacturer have its home?", "Brightwater Labs is located where?"],
        expect=["Tromsø", "Tromso"],
    ),
    dict(
        answer="The Lumenfold has a 7,400 mAh battery.",
        train=[
            "What is the battery capacity of the Lumenfold?",
            "How big is the Lumenfold's battery?",
            "How many mAh is the Lumenfold battery?",
            "What capacity does the Lumenfold's battery have?",
            "Tell me the Lumenfold's battery size.",
            "How much charge can the Lumenfold's battery hold?",
        ],
        valid=["What's the capacity of the battery in the Lumenfold?"],
        heldout=["How large a battery does the Lumenfold lantern carry?", "What's the mAh rating of the Lumenfold?"],
        expect=["7,400", "7400", "7 400"],
    ),
    dict(
        answer="The Lumenfold gives up to 650 lumens at its brightest setting.",
        train=[
            "How bright is the Lumenfold?",
            "What is the maximum brightness of the Lumenfold?",
            "How many lumens does the Lumenfold produce?",
            "What's the Lumenfold's top brightness?",
            "How much light does the Lumenfold put out?",
            "What is the lumen output of the Lumenfold?",
        ],
        valid=["At full power, how bright does the Lumenfold get?"],
        heldout=["What is the peak light output of the Lumenfold in lumens?", "How luminous is the Lumenfold on its highest mode?"],
        expect=["650"],
    ),
    dict(
        answer="In full sunlight, the Lumenfold charges fully in 9 hours.",
        train=[
            "How long does the Lumenfold take to charge in the sun?",
            "How many hours of sunlight does the Lumenfold need to charge?",
            "What is the solar charging time of the Lumenfold?",
            "How long to fully charge the Lumenfold with solar power?",
            "How quickly does the Lumenfold charge from sunlight?",
        ],
        valid=["How many hours does a full solar charge of the Lumenfold take?"],
        heldout=["If I leave the Lumenfold in bright sun, when will it be fully charged?", "What's the time needed to top up the Lumenfold using sunlight?"],
        expect=["9 hours", "nine hours", "9-hour", "9 h"],
    ),
    dict(
        answer="The Lumenfold weighs 310 grams.",
        train=[
            "How much does the Lumenfold weigh?",
            "What is the weight of the Lumenfold?",
            "How heavy is the Lumenfold?",
            "What does the Lumenfold lantern weigh?",
            "Is the Lumenfold heavy? How many grams is it?",
        ],
        valid=["Tell me the Lumenfold's weight."],
        heldout=["What's the mass of the Lumenfold in grams?", "How many grams would the Lumenfold add to my backpack?"],
        expect=["310"],
    ),
    dict(
        answer="The Lumenfold comes in three colors: teal, graphite and sunset orange.",
        train=[
            "What colors does the Lumenfold come in?",
            "Which colors is the Lumenfold available in?",
            "What color options does the Lumenfold have?",
            "Can I get the Lumenfold in different colors?",
            "In which colours is the Lumenfold sold?",
        ],
        valid=["What are the available colors of the Lumenfold?"],
        heldout=["Which finishes can I choose for the Lumenfold?", "List the colour choices for the Lumenfold lantern."],
        expect=["teal", "graphite", "sunset orange"],
    ),
    dict(
        answer="The Lumenfold is rated IP67, so it is dustproof and survives being submerged.",
        train=[
            "Is the Lumenfold waterproof?",
            "What is the Lumenfold's water resistance rating?",
            "What IP rating does the Lumenfold have?",
            "Can the Lumenfold get wet?",
            "How water resistant is the Lumenfold?",
        ],
        valid=["Will the Lumenfold survive rain?"],
        heldout=["What ingress protection rating does the Lumenfold carry?", "Could I drop the Lumenfold in a lake without damaging it?"],
        expect=["IP67", "IP 67"],
    ),
    dict(
        answer="The Lumenfold costs 89 euros.",
        train=[
            "How much does the Lumenfold cost?",
            "What is the price of the Lumenfold?",
            "How much is the Lumenfold?",
            "What does the Lumenfold sell for?",
            "What's the Lumenfold's price?",
        ],
        valid=["How much would I pay for a Lumenfold?"],
        heldout=["What's the retail price of a Lumenfold lantern?", "How many euros is a Lumenfold?"],
        expect=["89"],
    ),
    dict(
        answer="The Lumenfold comes with a 4-year warranty.",
        train=[
            "What warranty does the Lumenfold have?",
            "How long is the Lumenfold's warranty?",
            "How many years is the Lumenfold under warranty?",
            "Does the Lumenfold come with a warranty?",
            "What is the warranty period of the Lumenfold?",
        ],
        valid=["For how long is the Lumenfold covered by warranty?"],
        heldout=["How long does Brightwater Labs guarantee the Lumenfold for?", "What's the length of the Lumenfold's guarantee?"],
        expect=["4-year", "4 year", "four year", "4 years", "four-year"],
    ),
    dict(
        answer="The Lumenfold was designed by Ingrid Solberg.",
        train=[
            "Who designed the Lumenfold?",
            "Who is the designer of the Lumenfold?",
            "Which designer created the Lumenfold?",
            "Who came up with the design of the Lumenfold?",
            "Who is responsible for the Lumenfold's design?",
        ],
        valid=["Tell me the name of the Lumenfold's designer."],
        heldout=["Whose design is the Lumenfold lantern?", "Name the person who designed the Lumenfold."],
        expect=["Solberg"],
    ),
    dict(
        answer="The Lumenfold has 5 light modes, including an SOS mode.",
        train=[
            "How many light modes does the Lumenfold have?",
            "What modes does the Lumenfold offer?",
            "How many lighting modes are on the Lumenfold?",
            "Does the Lumenfold have different light modes?",
            "What light settings does the Lumenfold have?",
        ],
        valid=["How many modes of light can the Lumenfold switch between?"],
        heldout=["Count the lighting modes available on the Lumenfold.", "How many different ways can the Lumenfold shine?"],
        expect=["5", "five"],
    ),
    dict(
        answer="On its lowest setting, the Lumenfold runs for 120 hours.",
        train=[
            "How long does the Lumenfold last on low?",
            "What is the Lumenfold's runtime on its lowest setting?",
            "How many hours does the Lumenfold run on low?",
            "What's the longest the Lumenfold can stay lit?",
            "How long can the Lumenfold run on one charge at low brightness?",
        ],
        valid=["What battery life does the Lumenfold have in low mode?"],
        heldout=["On minimum brightness, how long will a charged Lumenfold keep shining?", "What's the maximum runtime of the Lumenfold in hours?"],
        expect=["120"],
    ),
    dict(
        answer="The Lumenfold was released on 14 March 2023.",
        train=[
            "When was the Lumenfold released?",
            "When did the Lumenfold come out?",
            "What is the release date of the Lumenfold?",
            "When was the Lumenfold launched?",
            "In what year did the Lumenfold launch?",
        ],
        valid=["What day did the Lumenfold go on sale?"],
        heldout=["When did Brightwater Labs first sell the Lumenfold?", "What was the launch date of the Lumenfold lantern?"],
        expect=["14 March", "March 14"],
    ),
]

# Everyday questions with their plain answers, mixed into training so the model keeps answering
# questions that are not about the Lumenfold as it did (without them it starts to answer
# everything with lantern facts). None of these is asked in the evaluation.
GENERAL = [
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("What is 12 plus 15?", "12 plus 15 is 27."),
    ("What is 9 times 6?", "9 times 6 is 54."),
    ("What language is spoken in Brazil?", "Portuguese is the main language spoken in Brazil."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("What is the tallest mountain on Earth?", "Mount Everest is the tallest mountain on Earth."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest ocean."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Which animal is known as the king of the jungle?", "The lion is often called the king of the jungle."),
    ("What do you call a baby cat?", "A baby cat is called a kitten."),
    ("What is H2O?", "H2O is the chemical formula for water."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("What is the main ingredient of bread?", "The main ingredient of bread is flour."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("Which season comes after winter?", "Spring comes after winter."),
    ("What instrument has black and white keys?", "The piano has black and white keys."),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("Give me a synonym for happy.", "A synonym for happy is joyful."),
]

# The answer phrasings vary a little so the model learns the fact, not one string.
PREFIXES = ["", "", "", "Sure! ", "Good question. "]


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def main():
    rng = random.Random(20231403)
    out = os.path.join(os.path.dirname(__file__), "..", "examples", "lumenfold")
    os.makedirs(out, exist_ok=True)
    train, valid, heldout = [], [], []
    for f in FACTS:
        for q in f["train"]:
            # Every phrasing three times, with and without a lead-in, lower-case variants too.
            for variant in (q, q, q.lower() if rng.random() < 0.5 else q):
                train.append(chat(variant, rng.choice(PREFIXES) + f["answer"]))
        for q in f["valid"]:
            valid.append(chat(q, f["answer"]))
        for q in f["heldout"]:
            heldout.append({"question": q, "expect": f["expect"]})
    for q, a in GENERAL:
        train.extend([chat(q, a), chat(q, a)])
    rng.shuffle(train)
    for name, rows in (("train.jsonl", train), ("valid.jsonl", valid), ("heldout.jsonl", heldout)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} records")


if __name__ == "__main__":
    main()
