"""Deterministic synthetic shop: catalogue, impression log with clicks and queries, reviews.

What makes the tasks learnable but not trivial:
- users have latent preferences over mid-level categories (Dirichlet, concentrated);
- sequential habits: after a device, its accessories are likely next (COMPLEMENTS);
- impressions show `slots` items; a click needs the slot to be examined (position bias,
  1/(1+slot)^0.9) and the item to be relevant (category match, user taste, item quality);
- search sessions carry a query written from the wanted leaf's vocabulary, sometimes vague, and
  the intent label is the category of the item actually clicked;
- reviews rate items by a hidden quality, and their words say the rating only roughly: a quarter
  are worded one star off, and most mix praise and complaints (`review_words`), so a review's
  sentiment has to be read, not looked up.
Everything but the reviews' wording is drawn from one numpy Generator seeded by `seed`; the wording
has a stream of its own, so the shop, the log and the ratings are those of that seed whatever it says.
"""
from __future__ import annotations


import numpy as np
import pyarrow as pa

from ..config import SyntheticConfig

# top > mid > leaf: {leaf: (nouns, attributes)}
TREE: dict[str, dict[str, dict[str, tuple[list[str], list[str]]]]] = {
    "Electronics": {
        "Audio": {
            "Headphones": (["headphones", "over-ear headphones", "headset"], ["wireless", "noise cancelling", "studio", "foldable"]),
            "Bluetooth Speakers": (["bluetooth speaker", "portable speaker", "party speaker"], ["waterproof", "wireless", "bass boost", "mini"]),
            "Earbuds": (["earbuds", "in-ear headphones", "sport earbuds"], ["wireless", "true wireless", "sweatproof", "compact"]),
        },
        "Computers": {
            "Laptops": (["laptop", "notebook computer", "ultrabook"], ["14 inch", "lightweight", "gaming", "touchscreen"]),
            "Laptop Bags": (["laptop bag", "laptop backpack", "laptop sleeve"], ["15 inch", "water resistant", "padded", "slim"]),
            "Computer Mice": (["mouse", "computer mouse", "trackball"], ["wireless", "ergonomic", "gaming", "silent"]),
            "Keyboards": (["keyboard", "mechanical keyboard", "keypad"], ["wireless", "backlit", "ergonomic", "compact"]),
        },
        "Cameras": {
            "Digital Cameras": (["digital camera", "mirrorless camera", "point and shoot camera"], ["4k", "compact", "waterproof", "zoom"]),
            "Memory Cards": (["memory card", "sd card", "microsd card"], ["64gb", "128gb", "high speed", "uhs-i"]),
            "Camera Tripods": (["tripod", "camera tripod", "monopod"], ["aluminum", "travel", "flexible", "lightweight"]),
        },
    },
    "Home & Kitchen": {
        "Coffee": {
            "Espresso Machines": (["espresso machine", "coffee maker", "cappuccino machine"], ["automatic", "15 bar", "compact", "stainless steel"]),
            "Coffee Grinders": (["coffee grinder", "burr grinder", "spice grinder"], ["electric", "manual", "conical", "adjustable"]),
            "Coffee Beans": (["coffee beans", "espresso beans", "ground coffee"], ["dark roast", "organic", "whole bean", "medium roast"]),
        },
        "Cookware": {
            "Frying Pans": (["frying pan", "skillet", "saute pan"], ["nonstick", "cast iron", "12 inch", "ceramic"]),
            "Stock Pots": (["stock pot", "soup pot", "dutch oven"], ["8 quart", "enameled", "stainless steel", "induction"]),
            "Knife Sets": (["knife set", "chef knife", "knife block"], ["german steel", "15 piece", "forged", "japanese"]),
        },
        "Bedding": {
            "Pillows": (["pillow", "bed pillow", "memory foam pillow"], ["cooling", "queen size", "hypoallergenic", "firm"]),
            "Duvet Covers": (["duvet cover", "comforter cover", "quilt cover"], ["cotton", "queen size", "linen", "striped"]),
            "Sheet Sets": (["sheet set", "bed sheets", "fitted sheet"], ["microfiber", "deep pocket", "king size", "bamboo"]),
        },
    },
    "Office Products": {
        "Printers & Ink": {
            "Inkjet Printers": (["inkjet printer", "all-in-one printer", "photo printer"], ["wireless", "color", "duplex", "compact"]),
            "Ink Cartridges": (["ink cartridge", "toner", "ink refill"], ["black", "tri-color", "high yield", "combo pack"]),
            "Printer Paper": (["printer paper", "copy paper", "photo paper"], ["8.5 x 11", "glossy", "500 sheets", "bright white"]),
        },
        "Writing": {
            "Ballpoint Pens": (["ballpoint pen", "gel pen", "rollerball pen"], ["black ink", "retractable", "fine point", "12 pack"]),
            "Notebooks": (["notebook", "journal", "composition book"], ["college ruled", "spiral", "hardcover", "dotted"]),
            "Highlighters": (["highlighter", "marker", "highlighter pen"], ["fluorescent", "chisel tip", "assorted colors", "6 pack"]),
        },
        "Desk Accessories": {
            "Desk Organizers": (["desk organizer", "file organizer", "pen holder"], ["mesh", "wooden", "5 compartment", "metal"]),
            "Staplers": (["stapler", "heavy duty stapler", "electric stapler"], ["desktop", "20 sheet", "jam free", "mini"]),
            "Desk Lamps": (["desk lamp", "led lamp", "reading lamp"], ["dimmable", "usb charging", "adjustable", "clamp"]),
        },
    },
    "Sports & Outdoors": {
        "Cycling": {
            "Road Bikes": (["road bike", "bicycle", "racing bike"], ["aluminum", "carbon", "21 speed", "lightweight"]),
            "Bike Helmets": (["bike helmet", "cycling helmet", "helmet"], ["adult", "ventilated", "mips", "adjustable"]),
            "Bike Lights": (["bike light", "headlight", "tail light"], ["usb rechargeable", "led", "waterproof", "bright"]),
        },
        "Camping": {
            "Tents": (["tent", "camping tent", "backpacking tent"], ["4 person", "waterproof", "instant", "ultralight"]),
            "Sleeping Bags": (["sleeping bag", "mummy bag", "camping quilt"], ["0 degree", "lightweight", "compact", "warm"]),
            "Camping Stoves": (["camping stove", "backpacking stove", "propane stove"], ["portable", "2 burner", "compact", "folding"]),
        },
        "Fitness": {
            "Yoga Mats": (["yoga mat", "exercise mat", "pilates mat"], ["non slip", "thick", "eco friendly", "extra long"]),
            "Dumbbells": (["dumbbells", "dumbbell set", "hand weights"], ["adjustable", "neoprene", "hex", "pair"]),
            "Resistance Bands": (["resistance bands", "exercise bands", "loop bands"], ["set of 5", "heavy", "fabric", "with handles"]),
        },
    },
}

# device leaf -> accessory leaves likely to be wanted next
COMPLEMENTS = {
    "Laptops": ["Laptop Bags", "Computer Mice", "Keyboards"],
    "Digital Cameras": ["Memory Cards", "Camera Tripods"],
    "Espresso Machines": ["Coffee Grinders", "Coffee Beans"],
    "Inkjet Printers": ["Ink Cartridges", "Printer Paper"],
    "Road Bikes": ["Bike Helmets", "Bike Lights"],
    "Tents": ["Sleeping Bags", "Camping Stoves"],
    "Headphones": ["Earbuds", "Bluetooth Speakers"],
    "Frying Pans": ["Knife Sets", "Stock Pots"],
}

# words shoppers type that titles never use: a pretrained text model knows them, TF-IDF on titles does not
QUERY_SYNONYMS = {
    "Headphones": ["cans", "over the ear audio"], "Bluetooth Speakers": ["boombox", "sound box"],
    "Earbuds": ["earphones", "airpods alternative"], "Laptops": ["portable computer", "chromebook"],
    "Laptop Bags": ["computer case", "messenger bag"], "Computer Mice": ["pointing device", "clicker for pc"],
    "Keyboards": ["typing board", "qwerty"], "Digital Cameras": ["dslr", "photo camera"],
    "Memory Cards": ["storage card", "flash card"], "Camera Tripods": ["camera stand", "selfie stick stand"],
    "Espresso Machines": ["barista machine", "latte maker"], "Coffee Grinders": ["bean mill", "coffee mill"],
    "Coffee Beans": ["arabica", "java"], "Frying Pans": ["wok", "omelette pan"],
    "Stock Pots": ["casserole", "big cooking pot"], "Knife Sets": ["cutlery", "santoku"],
    "Pillows": ["cushion for bed", "head rest for sleeping"], "Duvet Covers": ["bedspread", "comforter"],
    "Sheet Sets": ["bed linen", "linens"], "Inkjet Printers": ["printing machine", "photo copier"],
    "Ink Cartridges": ["refills for printer", "cartridge"], "Printer Paper": ["a4 sheets", "ream"],
    "Ballpoint Pens": ["biro", "writing pens"], "Notebooks": ["exercise book", "notepad"],
    "Highlighters": ["text marker", "neon markers"], "Desk Organizers": ["tidy for desk", "caddy"],
    "Staplers": ["paper fastener", "stapling machine"], "Desk Lamps": ["task light", "table lamp"],
    "Road Bikes": ["cycle", "racer bike"], "Bike Helmets": ["head protection cycling", "skid lid"],
    "Bike Lights": ["cycle lamp", "lights for cycling at night"], "Tents": ["shelter for camping", "bivouac"],
    "Sleeping Bags": ["sleep sack", "bedroll"], "Camping Stoves": ["outdoor cooker", "gas burner"],
    "Yoga Mats": ["mat for stretching", "gym mat"], "Dumbbells": ["free weights", "barbell"],
    "Resistance Bands": ["stretch bands", "elastic exercise straps"],
}
TYPO_RATE = 0.25  # share of queries with one typo (two neighbouring letters swapped)

BRANDS = {
    "Electronics": ["Voltio", "Auralis", "Nexon", "Pixelon", "Kestrel", "Zentro"],
    "Home & Kitchen": ["Casabel", "Brewster", "Hearthly", "Lumacook", "Nordvik", "Sleepwell"],
    "Office Products": ["Scriba", "Deskmate", "Inkwell", "Papyro", "Officio", "Stapleton"],
    "Sports & Outdoors": ["Trailfox", "Peakline", "Velocor", "Campora", "Fitora", "Ridgeway"],
}
COLORS = ["Black", "White", "Gray", "Blue", "Red", "Green", "Silver"]
QUERY_TEMPLATES = ["{n}", "{a} {n}", "best {n}", "{n} for {who}", "cheap {a} {n}", "{b} {n}", "{a}"]
WHO = ["home", "office", "travel", "students", "beginners", "kids"]
REVIEW_TITLES = {
    1: ["Stopped working", "Do not buy", "Very disappointed"],
    2: ["Not great", "Expected more", "Poor quality"],
    3: ["It's okay", "Average", "Does the job"],
    4: ["Good value", "Works well", "Happy with it"],
    5: ["Love this {n}", "Excellent", "Best {n} I've owned"],
}
REVIEW_TEXT = {
    1: "The {n} broke after a week. Returned it.",
    2: "The {n} works but feels cheap and the {a} part is weak.",
    3: "A decent {n}. Nothing special, but fine for the price.",
    4: "Solid {a} {n}. Would recommend to friends.",
    5: "Fantastic {n}, the {a} design is perfect. Five stars.",
}
# sentences a review adds to its opening line: praise, complaints, and remarks that say neither
REVIEW_NOTES = {
    "good": ["The {a} finish feels sturdy.", "Arrived fast and well packed.", "Easy to set up in minutes.",
             "Great value for the money.", "My kids use it every day.", "Exactly as described."],
    "bad": ["The {a} part came loose within a month.", "Shipping took over two weeks.", "The instructions were useless.",
            "Overpriced for what you get.", "Customer service never answered.", "It smells of plastic."],
    "flat": ["Bought it for the office.", "Looks like the pictures.", "It is what it is.", "Replacing an older {n}."],
}
# (praise, complaints) a review of each rating tends to mention; each is kept with p=0.8
REVIEW_MIX = {1: (0, 2), 2: (1, 2), 3: (1, 1), 4: (2, 1), 5: (2, 0)}
BASE_TIME = 1_700_000_000  # 2023-11-14, seconds


def review_words(rating: int, noun: str, attr: str, title: str, rng: np.random.Generator) -> tuple[str, str]:
    """(title, text) of a review of `rating` stars: worded as a neighbouring rating one time in four,
    the rating's opening line, then praise and complaints in proportions that lean with the rating."""
    said = int(np.clip(rating + rng.choice([-1, 1]), 1, 5)) if rng.random() < 0.25 else rating
    if said != rating:
        pool = REVIEW_TITLES[said]
        title = pool[rng.integers(len(pool))].format(n=noun)
    good, bad = REVIEW_MIX[said]
    notes = ([REVIEW_NOTES["good"][i] for i in rng.choice(len(REVIEW_NOTES["good"]), good, replace=False)]
             + [REVIEW_NOTES["bad"][i] for i in rng.choice(len(REVIEW_NOTES["bad"]), bad, replace=False)])
    notes = [n for n in notes if rng.random() < 0.8] + ([REVIEW_NOTES["flat"][rng.integers(len(REVIEW_NOTES["flat"]))]] if rng.random() < 0.3 else [])
    rng.shuffle(notes)
    text = " ".join([REVIEW_TEXT[said]] + notes).format(n=noun, a=attr)
    return title, text


def category_leaves() -> list[tuple[str, str, str]]:
    return [(top, mid, leaf) for top, mids in TREE.items() for mid, leaves in mids.items() for leaf in leaves]


def generate(cfg: SyntheticConfig) -> dict[str, pa.Table]:
    """Return {"items", "interactions", "reviews"} tables in the native input contract."""
    rng = np.random.default_rng(cfg.seed)
    leaves = category_leaves()
    leaf_names = [leaf for _, _, leaf in leaves]
    mids = sorted({(top, mid) for top, mid, _ in leaves})
    mid_of_leaf = np.array([mids.index((top, mid)) for top, mid, _ in leaves])
    n_leaves, n_mids = len(leaves), len(mids)

    # ---- catalogue: every leaf gets items, the rest by a random split
    n_items = cfg.items
    if n_items < n_leaves:
        raise ValueError(f"synthetic.items must be at least {n_leaves} (one per leaf category), got {n_items}")
    item_leaf = np.concatenate([np.arange(n_leaves), rng.integers(0, n_leaves, n_items - n_leaves)])
    item_leaf = item_leaf[rng.permutation(n_items)]
    quality = rng.normal(0, 1, n_items)
    appeal = rng.zipf(1.6, n_items).clip(1, 50).astype(float)  # long-tail popularity
    items = {"item_id": [], "title": [], "category": [], "brand": [], "description": [], "price": []}
    item_words = []
    for i in range(n_items):
        top, mid, leaf = leaves[item_leaf[i]]
        nouns, attrs = TREE[top][mid][leaf]
        noun, attr = nouns[rng.integers(len(nouns))], attrs[rng.integers(len(attrs))]
        brand = BRANDS[top][rng.integers(len(BRANDS[top]))]
        color = COLORS[rng.integers(len(COLORS))]
        items["item_id"].append(f"i{i:06d}")
        items["title"].append(f"{brand} {attr.title()} {noun.title()}, {color}")
        items["category"].append(f"{top} > {mid} > {leaf}")
        items["brand"].append(brand)
        items["description"].append(f"{attr} {noun} by {brand} in {color.lower()}.")
        items["price"].append(round(float(np.exp(rng.normal(3.3, 0.8))), 2))
        item_words.append((noun, attr, brand))
    by_leaf = [np.flatnonzero(item_leaf == j) for j in range(n_leaves)]
    by_mid = [np.flatnonzero(mid_of_leaf[item_leaf] == m) for m in range(n_mids)]
    popularity_cdf = np.cumsum(appeal) / appeal.sum()

    # ---- users, sessions, impressions
    inter = {k: [] for k in ("user_id", "item_id", "timestamp", "clicked", "query", "impression_id", "slot")}
    reviews = {k: [] for k in ("user_id", "item_id", "timestamp", "rating", "title", "text")}
    slot_exam = 1.0 / (1.0 + np.arange(cfg.slots)) ** 0.9
    wording = np.random.default_rng([cfg.seed, 1])  # the reviews' words: a stream of their own
    leaf_index = {name: j for j, name in enumerate(leaf_names)}
    impression = 0
    for u in range(cfg.users):
        user = f"u{u:06d}"
        pref = rng.dirichlet(np.full(n_mids, 0.25))
        n_sessions = max(3, int(rng.poisson(cfg.sessions_per_user)))
        t = BASE_TIME + int(rng.integers(0, 60 * 86400))
        last_leaf = None
        for _ in range(n_sessions):
            t += int(rng.exponential(2 * 86400)) + 60
            if last_leaf is not None and leaf_names[last_leaf] in COMPLEMENTS and rng.random() < 0.6:
                want = leaf_index[COMPLEMENTS[leaf_names[last_leaf]][rng.integers(len(COMPLEMENTS[leaf_names[last_leaf]]))]]
            else:
                m = rng.choice(n_mids, p=pref)
                leaf_ids = np.flatnonzero(mid_of_leaf == m)
                want = leaf_ids[rng.integers(len(leaf_ids))]
            query = None
            if rng.random() < cfg.query_rate:
                # search: mostly the wanted leaf, some of its mid, a few popular items
                top, mid, leaf = leaves[want]
                nouns, attrs = TREE[top][mid][leaf]
                tpl = QUERY_TEMPLATES[rng.integers(len(QUERY_TEMPLATES))]
                words = nouns + QUERY_SYNONYMS[leaf] * 2  # synonyms as likely as the title words
                query = tpl.format(n=words[rng.integers(len(words))], a=attrs[rng.integers(len(attrs))],
                                   who=WHO[rng.integers(len(WHO))], b=BRANDS[top][rng.integers(len(BRANDS[top]))].lower())
                if rng.random() < TYPO_RATE and len(query) > 3:
                    i = int(rng.integers(0, len(query) - 1))
                    query = query[:i] + query[i + 1] + query[i] + query[i + 2:]
                pools = [by_leaf[want]] * (cfg.slots - cfg.slots // 4 - 1) + [by_mid[mid_of_leaf[want]]] * (cfg.slots // 4) + [None]
            else:
                # browse feed: taste-driven mids plus popular items
                pools = [by_mid[rng.choice(n_mids, p=pref)] if rng.random() < 0.6 else None for _ in range(cfg.slots)]
            shown: list[int] = []
            for pool in pools[: cfg.slots]:
                for _ in range(5):  # avoid showing the same item twice in one impression
                    cand = int(pool[rng.integers(len(pool))]) if pool is not None and len(pool) else min(int(np.searchsorted(popularity_cdf, rng.random())), n_items - 1)
                    if cand not in shown:
                        break
                shown.append(cand)
            rng.shuffle(shown)
            shown_arr = np.array(shown)
            match = np.where(item_leaf[shown_arr] == want, 1.0, np.where(mid_of_leaf[item_leaf[shown_arr]] == mid_of_leaf[want], 0.35, 0.0))
            logit = -3.7 + 2.6 * match + 1.5 * pref[mid_of_leaf[item_leaf[shown_arr]]] + 0.5 * quality[shown_arr] + 0.15 * np.log(appeal[shown_arr])
            p_click = slot_exam[: len(shown)] / (1.0 + np.exp(-logit))
            clicks = rng.random(len(shown)) < p_click
            impression += 1
            for s, (item, clicked) in enumerate(zip(shown, clicks)):
                inter["user_id"].append(user)
                inter["item_id"].append(items["item_id"][item])
                inter["timestamp"].append(t)
                inter["clicked"].append(int(clicked))
                inter["query"].append(query)
                inter["impression_id"].append(f"imp{impression:08d}")
                inter["slot"].append(s)
                if clicked:
                    last_leaf = int(item_leaf[item])
                    if rng.random() < cfg.review_rate:
                        rating = int(np.clip(np.round(3.6 + 0.9 * quality[item] + rng.normal(0, 0.7)), 1, 5))
                        noun, attr, _ = item_words[item]
                        reviews["user_id"].append(user)
                        reviews["item_id"].append(items["item_id"][item])
                        reviews["timestamp"].append(t + int(rng.integers(86400, 20 * 86400)))
                        reviews["rating"].append(float(rating))
                        titles = REVIEW_TITLES[rating]
                        title, text = review_words(rating, noun, attr, titles[rng.integers(len(titles))].format(n=noun),
                                                   wording)
                        reviews["title"].append(title)
                        reviews["text"].append(text)

    schema_inter = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64()),
                              ("clicked", pa.int8()), ("query", pa.string()), ("impression_id", pa.string()),
                              ("slot", pa.int32())])
    schema_rev = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64()),
                            ("rating", pa.float64()), ("title", pa.string()), ("text", pa.string())])
    return {
        "items": pa.table(items),
        "interactions": pa.table(inter, schema=schema_inter),
        "reviews": pa.table(reviews, schema=schema_rev),
    }
