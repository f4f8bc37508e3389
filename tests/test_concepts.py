"""concepts_list.json: read, validate (every problem at once), write (Shivam's format)."""

from __future__ import annotations

import json

import pytest

from dbtools.dataset.concepts import Concept, ConceptError, read_concepts, validate_concepts, write_concepts


@pytest.fixture
def dirs(tmp_path, image_factory):
    inst, cls = tmp_path / "inst", tmp_path / "cls"
    image_factory(inst / "sub" / "a_1.png")
    cls.mkdir()
    return inst, cls


def test_round_trip_keeps_unknown_keys(tmp_path, dirs):
    inst, cls = dirs
    path = tmp_path / "concepts_list.json"
    concepts = [Concept(str(inst), "sks", "a dog", str(cls), extra={"caption_template": "{caption}"}),
                Concept(str(inst), prompt_template="{instance_prompt} {caption}")]
    write_concepts(path, concepts)
    data = json.loads(path.read_text())
    assert set(data[0]) == {"instance_prompt", "class_prompt", "instance_data_dir",
                            "class_data_dir", "caption_template"}
    assert data[1]["prompt_template"] == "{instance_prompt} {caption}"
    assert read_concepts(path) == concepts


def test_reads_shivam_file_and_single_object(tmp_path, dirs):
    inst, cls = dirs
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"instance_prompt": "photo of zwx dog", "class_prompt": "photo of a dog",
                                 "instance_data_dir": str(inst), "class_data_dir": str(cls)}]))
    [c] = read_concepts(path)
    assert (c.instance_prompt, c.class_data_dir, c.prompt_template) == ("photo of zwx dog", str(cls), None)
    path.write_text(json.dumps({"instance_data_dir": str(inst), "class_data_dir": None}))
    [c] = read_concepts(path)
    assert c.class_data_dir == "" and c.instance_prompt == ""
    validate_concepts([c])


@pytest.mark.parametrize("text, needle", [
    ("{not json", "not valid JSON"),
    ('"a string"', "must be a JSON list of objects"),
    ("[1, 2]", "must be a JSON list of objects"),
])
def test_read_errors(tmp_path, text, needle):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ConceptError, match=needle):
        read_concepts(path)


def test_read_missing_or_binary_file(tmp_path):
    with pytest.raises(ConceptError, match="file not found"):
        read_concepts(tmp_path / "nope.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConceptError, match="not valid JSON"):
        read_concepts(tmp_path / "bin.json")
    with pytest.raises(ConceptError, match="cannot read"):
        read_concepts(tmp_path)


def test_validate_lists_every_problem(tmp_path, dirs):
    inst, cls = dirs
    (tmp_path / "noimg").mkdir()
    (tmp_path / "noimg" / "notes.txt").write_text("x")
    (tmp_path / "noimg" / "Thumbs.db").write_bytes(b"x")
    concepts = [
        Concept(str(tmp_path / "missing")),
        Concept(str(tmp_path / "noimg")),
        Concept(str(inst), instance_prompt=5),
        Concept(str(inst), class_data_dir=str(tmp_path / "no" / "cls")),
        Concept(str(inst), prompt_template="{caption} {oops}"),
    ]
    with pytest.raises(ConceptError) as err:
        validate_concepts(concepts)
    msg = str(err.value)
    assert "concept 1" in msg and "missing does not exist" in msg
    assert "concept 2" in msg and "contains no images" in msg
    assert "concept 3: 'instance_prompt' must be a string, got 5" in msg
    assert "concept 4" in msg and "cls does not exist" in msg
    assert "concept 5" in msg and "unknown field" in msg


def test_empty_class_dir_is_never_the_current_folder(dirs):
    inst, cls = dirs
    validate_concepts([Concept(str(inst))])  # no prior preservation: fine
    with pytest.raises(ConceptError) as err:
        validate_concepts([Concept(str(inst), class_prompt="a dog", class_data_dir="")], need_class=True)
    assert "'class_data_dir' is empty" in str(err.value)
    with pytest.raises(ConceptError, match="needs a 'class_prompt'"):
        validate_concepts([Concept(str(inst), class_data_dir=str(cls))], need_class=True)
    validate_concepts([Concept(str(inst), "sks", "a dog", str(cls))], need_class=True)


def test_no_concepts():
    with pytest.raises(ConceptError, match="No concepts"):
        validate_concepts([])


def test_empty_instance_dir_string(tmp_path):
    with pytest.raises(ConceptError, match="'instance_data_dir' is empty"):
        validate_concepts([Concept("")])


def test_class_folder_may_be_created_later_when_its_parent_exists(dirs, tmp_path):
    inst, _ = dirs
    later = tmp_path / "class-images-to-generate"
    validate_concepts([Concept(str(inst), class_prompt="a dog", class_data_dir=str(later))],
                      need_class=True)
    assert not later.exists()  # validation never creates folders


def test_one_check_reports_type_errors_and_unknown_template_fields(tmp_path, dirs):
    from dbtools.dataset.concepts import concepts_problems

    inst, _ = dirs
    concepts = [Concept.from_dict({"instance_data_dir": 5}),
                Concept(str(inst), prompt_template="{caption}, {style}")]
    problems = concepts_problems(concepts)
    assert problems[0] == "concept 1: 'instance_data_dir' must be a string, got 5."
    assert "concept 2" in problems[1] and "'style'" in problems[1] and "unknown field" in problems[1]
    assert len(problems) == 2
    assert concepts_problems([]) != []


def test_overlap_check_gives_one_message_per_folder_not_per_pair(tmp_path, dirs):
    from dbtools.dataset.concepts import overlap_problems

    inst, _ = dirs
    same = [Concept(str(inst)) for _ in range(300)]  # 44,850 pairs
    (problem,) = overlap_problems(same)
    assert problem.startswith(f"instance folders overlap: {inst.resolve()} is used by concepts 1, 2, 3")
    assert problem.count(",") < 20 and "and 290 more" in problem
    distinct = [Concept(str(tmp_path / f"c{i}")) for i in range(300)]
    assert overlap_problems(distinct) == []
    nested = [Concept(str(inst)), Concept(str(inst / "sub")), Concept(str(inst / "sub")),
              Concept(str(inst / "sub" / "deeper"))]
    problems = overlap_problems(nested)
    assert len(problems) == 3  # sub twice; sub inside inst; deeper inside sub
    assert any("is inside" in p and "(concepts 2 and 3)" in p for p in problems)
    assert overlap_problems(nested, nested=False) == [problems[0]]
