"""Saved model shapes: written by `to_json`, read back by `from_json`, refused when they do not fit."""
import dataclasses
import json

import pytest
from distillery.models.seqrec import SeqSpec
from distillery.models.spec import SpecError
from distillery.models.student import StudentSpec
from distillery.models.teacher import TeacherSpec
from hypothesis import given, settings
from hypothesis import strategies as st

SEQ = SeqSpec(n_items=12, dim=16, layers=1, heads=2, dropout=0.1, max_history=5, text_dim=8)
TEACHER = TeacherSpec(n_items=12, n_categories=3, item_category=(0, 1, *[i % 3 for i in range(10)]),
                      classes={"intent": ("Office", "Sports"), "sentiment": ("negative", "positive")}, max_history=5, max_length=16, lexical_dim=8,
                      lexical_buckets=64, tasks=("recommendation", "ctr", "intent"),
                      sequences=(SEQ, dataclasses.replace(SEQ, dim=32, adaptor_hidden=24)))
STUDENT = StudentSpec(n_items=12, n_categories=3, classes={"intent": ("Office", "Sports")}, vocab_size=100, dim=16,
                      text_dim=8, ngram_buckets=64, heads=2, layers=0, dropout=0.1, max_history=5, ctr_history=4,
                      max_length=16, tasks=("recommendation", "intent"))


@pytest.mark.parametrize("spec", [SEQ, TEACHER, STUDENT], ids=["sequence", "teacher", "student"])
def test_a_spec_survives_a_json_file(spec):
    back = type(spec).from_json(json.loads(json.dumps(spec.to_json())))
    assert back == spec and hash(back) == hash(spec)


@settings(max_examples=40, deadline=None)
@given(ctr=st.none() | st.integers(1, 512), kept=st.none() | st.integers(1, 10_000), item_text=st.booleans(),
       classes=st.dictionaries(st.text(min_size=1, max_size=8),
                               st.lists(st.text(min_size=1, max_size=8), max_size=5).map(tuple), max_size=3))
def test_compressed_student_shapes_survive_a_json_file(ctr, kept, item_text, classes):
    spec = dataclasses.replace(STUDENT, ctr_hidden=ctr, text_rows_kept=kept, item_text=item_text, classes=classes)
    back = StudentSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert back == spec and hash(back) == hash(spec) and list(back.classes) == list(classes)


def test_a_spec_missing_a_field_is_refused_with_the_file_and_field_named():
    d = STUDENT.to_json()
    del d["vocab_size"]
    with pytest.raises(SpecError, match=r"runs/x/student\.json: missing field\(s\) \['vocab_size'\]"):
        StudentSpec.from_json(d, "runs/x/student.json")


def test_an_unknown_field_is_refused_not_dropped():
    with pytest.raises(SpecError, match=r"unknown field\(s\) \['n_experts'\]"):
        StudentSpec.from_json({**STUDENT.to_json(), "n_experts": 4})
    with pytest.raises(SpecError, match=r"teacher\.json: sequences\[1\]: unknown field\(s\) \['width'\]"):
        TeacherSpec.from_json({**TEACHER.to_json(), "sequences": [SEQ.to_json(), {**SEQ.to_json(), "width": 3}]},
                              "teacher.json")


def test_a_sequence_spec_saved_before_the_mlp_adaptor_reads_as_a_linear_adaptor():
    old = {k: v for k, v in SEQ.to_json().items() if k != "adaptor_hidden"}
    assert SeqSpec.from_json(old).adaptor_hidden == 0


@pytest.mark.parametrize("field,value", [("dim", "16"), ("dim", 16.5), ("dim", True), ("tasks", "intent"),
                                         ("item_text", 1), ("ctr_hidden", "wide"), ("classes", {"intent": [1, 2]}),
                                         ("classes", ["Office"]), ("classes", {"intent": "Office"})])
def test_a_value_of_the_wrong_type_is_refused(field, value):
    with pytest.raises(SpecError, match=field):
        StudentSpec.from_json({**STUDENT.to_json(), field: value})


def test_optional_fields_take_their_defaults_and_ints_read_as_floats():
    d = {k: v for k, v in STUDENT.to_json().items() if k not in ("ctr_hidden", "class_hidden", "text_rows_kept",
                                                                  "item_text")}
    back = StudentSpec.from_json({**d, "dropout": 0})
    assert back == dataclasses.replace(STUDENT, dropout=0.0) and isinstance(back.dropout, float)
