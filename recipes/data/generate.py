"""Write the small `topic` and `question` classification sets (written for ia3cli, Apache-2.0).

Each class has its own sentence patterns and word lists (invented places, people and companies; no real names);
rows are drawn with a fixed seed, duplicates are dropped, no sentence appears in both splits, and four patterns
of each class are used for validation only.

    python recipes/data/generate.py        # rewrites recipes/data/{topic,question}/{train,validation}.jsonl
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20261123
TRAIN, VALIDATION = 160, 100
HELD_OUT = 4  # patterns per class kept for validation only

# --- shared word lists ----------------------------------------------------------------------------------------------

COUNTRIES = ["Norvania", "Estmark", "Valdoria", "Kesh", "Ombria", "Tarland", "Lusenia", "Brevik", "Caldora", "Irrath"]
CITIES = ["Port Avel", "Marisca", "Dunhollow", "Teramo Bay", "Quillfield", "Sorrento Vale", "Ashgrove", "Kelmouth",
          "Brinmoor", "Velstad", "Larkspur", "Ondaro"]  # fmt: skip
PEOPLE = ["Ada Morrow", "Tomas Reyl", "Priya Das", "Jonah Kell", "Mira Osei", "Elias Brandt", "Nora Vance",
          "Samir Haddad", "Lena Fosk", "Oskar Thiel", "Ines Carvo", "Wen Liao"]  # fmt: skip
COMPANIES = ["Brightwell Foods", "Kestrel Motors", "Halden Bank", "Orbis Telecom", "Greystone Mining", "Luma Retail",
             "Northpeak Airlines", "Calder Steel", "Vireo Pharma", "Tidewater Shipping"]  # fmt: skip
TEAMS = ["the Marisca Falcons", "Dunhollow Rovers", "the Kelmouth Tides", "Ashgrove United", "the Velstad Bears",
         "Port Avel City", "the Brinmoor Hawks", "Quillfield Athletic"]  # fmt: skip
NUMBERS = ["two", "three", "four", "five", "six", "twelve", "forty", "several", "dozens of", "hundreds of"]
PERCENT = ["2", "3.5", "4", "7", "9", "11", "15", "18", "0.5", "1.2"]

# --- topic: world, sports, business, science -------------------------------------------------------------------------

TOPIC = {
    "world": [
        "Leaders of {country} and {country2} signed a ceasefire after {number} weeks of talks.",
        "Floods forced {number} families from their homes in northern {country}.",
        "The parliament of {country} voted to hold early elections next spring.",
        "Protesters gathered outside the embassy in {city} demanding the release of detained journalists.",
        "{country} recalled its ambassador after a dispute over fishing rights.",
        "Aid convoys reached villages cut off by the earthquake near {city}.",
        "The president of {country} survived a no-confidence vote by a narrow margin.",
        "Border crossings between {country} and {country2} reopened on Monday.",
        "A summit in {city} ended without agreement on refugee quotas.",
        "Voters in {country} rejected the proposed constitution in a referendum.",
        "The foreign minister of {country} arrived in {city} for peace talks.",
        "Wildfires near the capital of {country} prompted a state of emergency.",
        "{person} was sworn in as prime minister of {country} after a month of coalition talks.",
        "United Nations observers will monitor the disputed vote in {country}.",
        "Curfews were lifted in {city} after a week of unrest.",
    ],
    "sports": [
        "{team} beat {team2} 3-1 to reach the cup final.",
        "{person} set a new national record in the 400 metres.",
        "The coach of {team} was sacked after {number} straight defeats.",
        "{team} signed a young striker from {team2} for an undisclosed fee.",
        "Rain delayed the final round of the golf open in {city}.",
        "{person} won her third marathon title in {city} on Sunday.",
        "A late penalty gave {team} a draw against {team2}.",
        "The cycling tour will finish with a mountain stage above {city}.",
        "{person} retired from tennis after fifteen seasons on the tour.",
        "{team} clinched the league title with two games to spare.",
        "The national rugby side of {country} named {number} new caps for the autumn series.",
        "{person} scored twice as {team} came from behind to win.",
        "Ticket sales for the swimming championships in {city} have already sold out.",
        "The goalkeeper of {team} saved two penalties in the shootout.",
        "{country} will host the next world athletics championships.",
    ],
    "business": [
        "{company} shares rose {percent} percent after strong quarterly earnings.",
        "{company} agreed to buy {company2} in a deal worth billions.",
        "The central bank of {country} raised interest rates by half a point.",
        "{company} will cut {number} hundred jobs as demand slows.",
        "Inflation in {country} eased to {percent} percent last month.",
        "{company} opened a new factory outside {city}.",
        "Oil prices fell sharply after producers agreed to pump more.",
        "{company} reported a loss for the second year in a row.",
        "Retail sales in {country} grew faster than economists expected.",
        "Investors pulled money from {company} after its chief executive resigned.",
        "The merger of {company} and {company2} was blocked by regulators.",
        "{company} plans to list its shares on the stock exchange in {city}.",
        "Unemployment in {country} dropped to {percent} percent, the lowest in a decade.",
        "{person} was named chief executive of {company}.",
        "Exports from {country} slumped as the currency strengthened.",
    ],
    "science": [
        "Astronomers spotted a comet that will pass close to Earth next year.",
        "Researchers in {city} grew a working miniature liver in the lab.",
        "A new battery design charges in minutes and lasts for years, engineers say.",
        "{person} and colleagues mapped the genome of a rare deep-sea fish.",
        "The space agency of {country} launched its first weather satellite.",
        "A study found that {number} species of frog can survive being frozen.",
        "Physicists measured the mass of a particle with record precision.",
        "A robot built at the university of {city} learned to sort recycling by touch.",
        "Fossils found near {city} belong to a previously unknown dinosaur.",
        "A software update lets old phones run speech recognition offline.",
        "Scientists warned that coral reefs off {country} are bleaching faster than expected.",
        "Engineers tested a quieter jet engine that burns less fuel.",
        "{person} won an award for a vaccine that needs no refrigeration.",
        "A telescope captured the clearest image yet of a distant galaxy.",
        "Biologists discovered bacteria that can break down plastic bottles.",
    ],
}

# --- question type: person, place, number, time ----------------------------------------------------------------------

QUESTION = {
    "person": [
        "Who wrote the first dictionary of the {language} language?",
        "Who painted the mural in the town hall of {city}?",
        "Who was the first woman to lead {country}?",
        "Which scientist discovered the cause of the fever in {city}?",
        "Who founded {company}?",
        "Name the composer of the anthem of {country}.",
        "Who is the captain of {team}?",
        "Which explorer first crossed the {desert} desert?",
        "Who designed the bridge over the river in {city}?",
        "Who coached {team} to their first title?",
        "Which author created the detective who lives in {city}?",
        "Who invented the {device}?",
        "Whose portrait is printed on the banknotes of {country}?",
        "Which architect built the library of {city}?",
    ],
    "place": [
        "Where is the headquarters of {company}?",
        "In which country is the city of {city}?",
        "Where did {person} grow up?",
        "Which city hosts the annual film festival of {country}?",
        "Where does the river that flows through {city} reach the sea?",
        "What is the capital of {country}?",
        "Where was the {device} first built?",
        "In which region of {country} is the {desert} desert?",
        "Where do {team} play their home games?",
        "Which country borders {country} to the north?",
        "Where can visitors see the old fortress walls near {city}?",
        "In what city did {person} open her first shop?",
        "Which island is the largest in {country}?",
        "Where will the next summit of {country} and {country2} take place?",
    ],
    "number": [
        "How many people live in {city}?",
        "How much does a train ticket from {city} to {city2} cost?",
        "How many players are on the squad of {team}?",
        "What is the population of {country}?",
        "How many languages are spoken in {country}?",
        "How tall is the tower in the centre of {city}?",
        "How many employees does {company} have?",
        "How far is {city} from {city2}?",
        "How many goals did {person} score last season?",
        "What percentage of {country} is covered by forest?",
        "How many seats are in the parliament of {country}?",
        "How long is the {desert} desert from end to end?",
        "How much did {company} pay for its new offices?",
        "How many moons does the planet in the {language} legend have?",
    ],
    "time": [
        "When did {country} become independent?",
        "What year was {company} founded?",
        "When was the {device} invented?",
        "When does the festival in {city} begin?",
        "In what year did {person} win the prize?",
        "What time does the last ferry leave {city}?",
        "When will {team} play their next match?",
        "How long ago was the {desert} desert a sea?",
        "On what date was the treaty between {country} and {country2} signed?",
        "When did {person} first visit {city}?",
        "What century was the cathedral of {city} built in?",
        "When is the next election in {country}?",
        "At what age did {person} start painting?",
        "When did the old harbour of {city} close?",
    ],
}
LANGUAGES = ["Estmarkish", "Valdoran", "Keshite", "Ombrian", "Lusenian", "Tarlandic"]
DESERTS = ["Sarrow", "Red Ash", "Qeltan", "Morrow Flats", "Olduin"]
DEVICES = ["pressure cooker", "folding bicycle", "tide clock", "typewriter", "water filter", "night-vision lens",
           "ticket machine", "wind pump"]  # fmt: skip

SLOTS = {
    "country": COUNTRIES, "country2": COUNTRIES, "city": CITIES, "city2": CITIES, "person": PEOPLE,
    "company": COMPANIES, "company2": COMPANIES, "team": TEAMS, "team2": TEAMS, "number": NUMBERS,
    "percent": PERCENT, "language": LANGUAGES, "desert": DESERTS, "device": DEVICES,
}  # fmt: skip


def fill(template: str, rng: random.Random) -> str:
    """Fill each ``{slot}``; ``{x2}`` never repeats ``{x}`` in the same sentence."""
    chosen: dict[str, str] = {}
    for slot in re.findall(r"{(\w+)}", template):
        options = [o for o in SLOTS[slot] if o != chosen.get(slot.rstrip("2"))]
        chosen[slot] = rng.choice(options)
    text = template.format(**chosen)
    return text[0].upper() + text[1:]


def make(classes: dict[str, list[str]], rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Balanced rows: TRAIN and VALIDATION split evenly over the classes, no sentence in both."""
    train: list[dict] = []
    validation: list[dict] = []
    seen: set[str] = set()
    per_train, per_val = TRAIN // len(classes), VALIDATION // len(classes)
    for label, templates in enumerate(classes.values()):
        # the last HELD_OUT patterns with slots of each class appear only in validation: it tests more than the
        # slot filling of patterns seen in training
        held_out = [t for t in templates if "{" in t][-HELD_OUT:]
        seen_in_training = [t for t in templates if t not in held_out]
        for split, patterns, n in ((train, seen_in_training, per_train), (validation, held_out, per_val)):
            rows: list[str] = []
            attempts = 0
            while len(rows) < n:
                attempts += 1
                assert attempts < 100_000, "not enough distinct sentences"
                text = fill(rng.choice(patterns), rng)
                if text not in seen:
                    seen.add(text)
                    rows.append(text)
            split += [{"text": t, "label": label} for t in rows]
    rng.shuffle(train)
    rng.shuffle(validation)
    return train, validation


def write(folder: Path, rows: list[dict]) -> None:
    folder.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(SEED)
    for name, classes in (("topic", TOPIC), ("question", QUESTION)):
        train, validation = make(classes, rng)
        (HERE / name).mkdir(exist_ok=True)
        write(HERE / name / "train.jsonl", train)
        write(HERE / name / "validation.jsonl", validation)
        print(f"{name}: {len(train)} train, {len(validation)} validation, classes {list(classes)}")


if __name__ == "__main__":
    main()
