import numpy as np
import pyarrow.parquet as pq

from distillery.cli import main
from distillery.config import SyntheticConfig
from distillery.data.synthetic import COMPLEMENTS, TREE, category_leaves, generate

SMALL = SyntheticConfig(users=300, items=150, seed=3)


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = generate(SMALL), generate(SMALL), generate(SMALL.model_copy(update={"seed": 4}))
    for name in a:
        assert a[name].equals(b[name]), name
    assert not a["interactions"].equals(c["interactions"])


def test_category_tree_shape():
    leaves = category_leaves()
    assert len(leaves) >= 20 and all(len(path) == 3 for path in leaves)
    items = generate(SMALL)["items"].to_pandas()
    assert items["category"].str.count(" > ").eq(2).all()
    assert items["category"].nunique() == len(leaves)  # every leaf is stocked
    # titles are built from the leaf's vocabulary and the brand
    for title, cat, brand in items[["title", "category", "brand"]].head(50).itertuples(index=False):
        top, mid, leaf = cat.split(" > ")
        nouns, attrs = TREE[top][mid][leaf]
        assert title.startswith(brand) and any(n.title() in title for n in nouns)


def test_ctr_in_range_with_position_bias():
    inter = generate(SyntheticConfig(users=600, items=200, seed=1))["interactions"].to_pandas()
    ctr = inter["clicked"].mean()
    assert 0.02 <= ctr <= 0.10, ctr
    by_slot = inter.groupby("slot")["clicked"].mean()
    assert by_slot.iloc[0] > 2 * by_slot.iloc[-1]


def test_users_have_concentrated_category_preferences():
    t = generate(SyntheticConfig(users=400, items=200, seed=5))
    mid = t["items"].to_pandas().set_index("item_id")["category"].str.rsplit(" > ", n=1).str[0]
    clicks = t["interactions"].to_pandas().query("clicked == 1")
    clicks["mid"] = clicks["item_id"].map(mid)
    per_user = clicks.groupby("user_id")["mid"].agg(lambda s: s.value_counts(normalize=True).iloc[0])
    assert per_user.mean() > 3 / mid.nunique()  # a user's top mid category far above a uniform share


def test_sequential_habit_accessories_follow_devices():
    t = generate(SyntheticConfig(users=800, items=300, seed=2))
    items = t["items"].to_pandas().set_index("item_id")["category"].str.split(" > ").str[-1]
    clicks = t["interactions"].to_pandas().query("clicked == 1").sort_values(["user_id", "timestamp", "slot"])
    clicks["leaf"] = clicks["item_id"].map(items)
    clicks["next_leaf"] = clicks.groupby("user_id")["leaf"].shift(-1)
    after_device = clicks[clicks["leaf"].isin(list(COMPLEMENTS))].dropna(subset=["next_leaf"])
    hit = np.mean([n in COMPLEMENTS[d] for d, n in zip(after_device["leaf"], after_device["next_leaf"])])
    base = np.mean([n in COMPLEMENTS[d] for d, n in zip(after_device["leaf"], clicks["leaf"].sample(len(after_device), random_state=0, replace=True))])
    assert hit > 2 * base


def test_queries_are_labelled_by_clicked_item_and_reviews_valid():
    t = generate(SMALL)
    inter = t["interactions"].to_pandas()
    searches = inter[inter["query"].notna()]
    assert 0.2 < searches["impression_id"].nunique() / inter["impression_id"].nunique() < 0.6
    assert searches["clicked"].sum() > 0
    reviews = t["reviews"].to_pandas()
    assert len(reviews) > 0 and reviews["rating"].between(1, 5).all()
    assert reviews["title"].str.len().gt(0).all() and reviews["text"].str.len().gt(0).all()


def test_generate_data_cli_writes_contract_files(tmp_path, capsys):
    assert main(["generate-data", str(tmp_path), "--users", "50", "--items", "40", "--seed", "7"]) == 0
    items = pq.read_table(tmp_path / "items.parquet")
    inter = pq.read_table(tmp_path / "interactions.parquet")
    assert {"item_id", "title", "category", "brand", "price"} <= set(items.column_names)
    assert {"user_id", "item_id", "timestamp", "clicked", "query", "impression_id", "slot"} <= set(inter.column_names)
    assert "rows" in capsys.readouterr().out
    assert main(["generate-data", str(tmp_path), "--items", "5"]) == 2
