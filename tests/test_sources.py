"""Each reader/adapter on a few rows built here, read through Ray Data into the native contract."""
import json

import pandas as pd
import pytest
from distillery.config import DataConfig
from distillery.data.sources import amazon_item, amazon_review, load_sources

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_local")]


def _pd(ds):
    return ds.to_pandas().sort_values([c for c in ("user_id", "item_id", "timestamp") if c in ds.columns()]).reset_index(drop=True)


@pytest.mark.parametrize("ext", ["parquet", "jsonl", "csv", "tsv"])
def test_native_formats(tmp_path, ext):
    items = pd.DataFrame({"item_id": ["007", "008"], "title": ["Pen", "Ink"], "category": ["A > B", "A > C"]})
    inter = pd.DataFrame({"user_id": ["01", "01"], "item_id": ["007", "008"], "timestamp": [1, 2], "shop": ["x", "y"]})
    paths = {}
    for name, df in (("items", items), ("interactions", inter)):
        path = tmp_path / f"{name}.{ext}"
        if ext == "parquet":
            df.to_parquet(path)
        elif ext == "jsonl":
            df.to_json(path, orient="records", lines=True)
        else:
            df.to_csv(path, index=False, sep="\t" if ext == "tsv" else ",")
        paths[name] = str(path)
    src = load_sources(DataConfig(format="native", **paths))
    got = _pd(src["interactions"])
    assert got["item_id"].tolist() == ["007", "008"]  # ids stay strings (leading zeros kept)
    assert got["shop"].tolist() == ["x", "y"]  # unknown columns are kept
    assert got["_source"].str.endswith(f"interactions.{ext}").all()
    assert _pd(src["items"])["title"].tolist() == ["Pen", "Ink"]


def test_parquet_is_read_with_ray_datas_task_based_reader_and_the_context_is_left_as_it_was(tmp_path, monkeypatch):
    import ray.data
    from distillery.data.sources import read_parquet

    folder = tmp_path / "parts"
    folder.mkdir()
    pd.DataFrame({"k": [1, 2, 3]}).to_parquet(folder / "part-0.parquet")
    pd.DataFrame({"k": [4, 5]}).to_parquet(folder / "part-1.parquet")
    ctx = ray.data.DataContext.get_current()
    monkeypatch.delenv("RAY_DATA_USE_DATASOURCE_V2", raising=False)
    monkeypatch.setattr(ctx, "use_datasource_v2", True)
    ds = read_parquet(str(folder))
    assert ds._logical_plan.dag.name == "ReadParquet"  # V2 plans ListFiles -> ReadFiles instead
    assert sorted(ds.to_pandas()["k"]) == [1, 2, 3, 4, 5]
    assert ctx.use_datasource_v2 is True
    with pytest.raises(FileNotFoundError):
        read_parquet(str(tmp_path / "absent"))
    assert ctx.use_datasource_v2 is True  # restored when the read fails too
    # a user who asks for Ray's default reader gets it
    monkeypatch.setenv("RAY_DATA_USE_DATASOURCE_V2", "1")
    assert read_parquet(str(folder))._logical_plan.dag.name != "ReadParquet"
    assert ctx.use_datasource_v2 is True


def test_folder_and_file_uri(tmp_path):
    folder = tmp_path / "log"
    folder.mkdir()
    for k in range(3):
        pd.DataFrame({"user_id": [f"u{k}"], "item_id": ["a"], "timestamp": [k]}).to_parquet(folder / f"part-{k}.parquet")
    pd.DataFrame({"item_id": ["a"]}).to_parquet(tmp_path / "items.parquet")
    src = load_sources(DataConfig(format="native", interactions=f"file://{folder}", items=str(tmp_path / "items.parquet")))
    assert sorted(src["interactions"].to_pandas()["user_id"]) == ["u0", "u1", "u2"]


def test_lcrec(tmp_path):
    (tmp_path / "Office.inter.json").write_text(json.dumps({"0": [5, 6, 7], "1": [6]}))
    (tmp_path / "Office.item.json").write_text(json.dumps({
        "5": {"title": "Pen", "description": "blue", "brand": "Bic", "categories": "Office, Writing, Pens"},
        "6": {"title": "Ink", "categories": "Office, Printers"}, "7": {"title": "Pad"}}))
    src = load_sources(DataConfig(format="lcrec", interactions=str(tmp_path / "Office.inter.json"),
                                  items=str(tmp_path / "Office.item.json")))
    inter = src["interactions"].to_pandas()
    assert inter[inter["user_id"] == "0"].sort_values("position")["item_id"].tolist() == ["5", "6", "7"]
    items = src["items"].to_pandas().set_index("item_id")
    assert items.loc["5", "category"] == "Office > Writing > Pens" and items.loc["5", "brand"] == "Bic"


REVIEWS = {
    2014: {"reviewerID": "A1", "asin": "B1", "overall": 5.0, "summary": "Great", "reviewText": "Nice pen", "unixReviewTime": 1400000000},
    2018: {"reviewerID": "A2", "asin": "B1", "overall": 4.0, "summary": "Good", "reviewText": "Fine", "unixReviewTime": 1500000000, "vote": "2"},
    2023: {"user_id": "A3", "asin": "B1-red", "parent_asin": "B1", "rating": 3.0, "title": "Ok", "text": "Meh", "timestamp": 1600000000000},
}
METAS = [
    "{'asin': 'B1', 'title': 'Pen', 'categories': [['Office Products', 'Writing', 'Pens']], 'price': 3.5}",  # 2014: python literal
    json.dumps({"asin": "B2", "title": "Ink", "category": ["Office Products", "Ink"], "brand": "HP", "price": "$12.99", "description": ["Black", "ink"]}),
    json.dumps({"parent_asin": "B3", "title": "Pad", "main_category": "Office Products", "categories": ["Paper"], "store": "Acme", "price": None}),
]


def test_amazon_field_names_per_year():
    assert amazon_review(REVIEWS[2014]) == {"user_id": "A1", "item_id": "B1", "timestamp": 1400000000, "rating": 5.0,
                                           "title": "Great", "text": "Nice pen"}
    assert amazon_review(REVIEWS[2018])["title"] == "Good"
    r23 = amazon_review(REVIEWS[2023])
    assert r23["item_id"] == "B1" and r23["timestamp"] == 1600000000  # parent asin, ms -> s
    assert amazon_item({"parent_asin": "B3", "main_category": "Office", "categories": ["Paper"]})["category"] == ["Office", "Paper"]


def test_amazon_jsonl_with_a_broken_line(tmp_path):
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("\n".join(json.dumps(r) for r in REVIEWS.values()) + "\n{not json\n")
    meta = tmp_path / "meta.jsonl"
    meta.write_text("\n".join(METAS) + "\n")
    src = load_sources(DataConfig(format="amazon", interactions=str(reviews), items=str(meta)))
    rev = src["reviews"].to_pandas()
    assert len(rev) == 4 and rev["_parse_error"].notna().sum() == 1  # kept, to be quarantined
    ok = rev[rev["_parse_error"].isna()].set_index("user_id")
    assert ok.loc["A3", "timestamp"] == "1600000000" and ok.loc["A1", "text"] == "Nice pen"
    assert set(src["interactions"].columns()) >= {"user_id", "item_id", "timestamp"}
    items = src["items"].to_pandas().set_index("item_id")
    assert items.loc["B1", "category"] == "Office Products > Writing > Pens"
    assert items.loc["B2", "price"] == "$12.99" and items.loc["B2", "description"] == "Black ink"
    assert items.loc["B3", "category"] == "Office Products > Paper" and items.loc["B3", "brand"] == "Acme"


def test_mind(tmp_path):
    (tmp_path / "behaviors.tsv").write_text(
        "1\tU1\t11/11/2019 9:05:58 AM\tN1 N2\tN3-1 N4-0\n"
        "2\tU1\t11/12/2019 9:05:58 AM\tN1 N2\tN5-0\n"
        "3\tU2\t11/12/2019 10:00:00 AM\t\tN3-0 N5-1\n"
        "broken line\n")
    (tmp_path / "news.tsv").write_text("N3\tnews\tpolitics\tTitle three\tAbstract\thttp://x\t[]\t[]\n"
                                       "N5\tsports\tgolf\tTitle five\t\thttp://y\t[]\t[]\n")
    src = load_sources(DataConfig(format="mind", interactions=str(tmp_path / "behaviors.tsv"), items=str(tmp_path / "news.tsv")))
    inter = src["interactions"].to_pandas()
    shown = inter[inter["impression_id"].notna()]
    assert len(shown) == 5 and shown["clicked"].tolist().count("1") == 2
    history = inter[inter["history_rank"].notna()]
    assert sorted(history["item_id"]) == ["N1", "N2"]  # U1's history once, not once per impression
    assert inter["_parse_error"].notna().sum() == 1
    items = src["items"].to_pandas().set_index("item_id")
    assert items.loc["N3", "category"] == "news > politics" and items.loc["N3", "title"] == "Title three"


def test_huggingface_save_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"user_id": ["u1", "u2"], "item_id": ["a", "b"], "timestamp": [1, 2]}).save_to_disk(str(tmp_path / "inter"))
    datasets.DatasetDict({"full": datasets.Dataset.from_dict({"item_id": ["a", "b"], "title": ["x", "y"]})}).save_to_disk(str(tmp_path / "items"))
    src = load_sources(DataConfig(format="native", reader="hf", interactions=str(tmp_path / "inter"),
                                  items=f"{tmp_path / 'items'}?split=full"))
    assert sorted(src["interactions"].to_pandas()["user_id"]) == ["u1", "u2"]
    assert sorted(src["items"].to_pandas()["title"]) == ["x", "y"]


def test_huggingface_amazon_2023_schema(tmp_path):
    import datasets

    datasets.Dataset.from_list([REVIEWS[2023]]).save_to_disk(str(tmp_path / "rev"))
    datasets.Dataset.from_list([json.loads(METAS[2])]).save_to_disk(str(tmp_path / "meta"))
    src = load_sources(DataConfig(format="amazon", reader="hf", interactions=str(tmp_path / "rev"), items=str(tmp_path / "meta")))
    assert src["reviews"].to_pandas()["item_id"].tolist() == ["B1"]
    items = src["items"].to_pandas()
    assert items["item_id"].tolist() == ["B3"] and items["category"].tolist() == ["Office Products > Paper"]


def test_tables_are_written_under_a_file_uri(tmp_path):
    import pyarrow as pa
    from distillery import storage
    from distillery.stages.prepare import write_tables

    assert storage.parent(f"file://{tmp_path}/a/b.parquet") == f"file://{tmp_path}/a"
    paths = write_tables({"items": pa.table({"x": [1, 2]})}, f"file://{tmp_path}/out")
    assert paths["items"] == f"file://{tmp_path}/out/items.parquet"
    assert (tmp_path / "out" / "items.parquet").is_file()  # a file, not a folder named after it


def test_folders_and_files_upload_to_a_file_uri_whose_parents_do_not_exist(tmp_path):
    from distillery import storage

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    storage.upload_dir(str(src), f"file://{tmp_path}/x/y/model")
    assert (tmp_path / "x" / "y" / "model" / "sub" / "b.txt").read_text() == "b"
    storage.upload_file(str(src / "a.txt"), f"file://{tmp_path}/p/q/a.txt")
    assert (tmp_path / "p" / "q" / "a.txt").read_text() == "a"
