"""Bad dataset input: one ConfigError line naming the file, line, column or key and what is accepted."""
import json

import pytest

from rlt.data.config import DataConfig, FormatConfig
from rlt.data.loading import load_dataset_examples, load_table
from rlt.errors import ConfigError


def write_jsonl(path, rows):
    """Rows (dicts, or raw strings written as they are) as lines of a file; returns its path as text."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def load(source, **data):
    """(examples, format) as the trainers load them."""
    return load_dataset_examples(DataConfig(dataset_id_or_path=source, **data), FormatConfig())


def error_of(source, **data) -> str:
    with pytest.raises(ConfigError) as e:
        load(source, **data)
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything asks the hub (or datasets' generic loader) for a dataset."""
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or pytest.fail(f"hub: {a}"))
    return calls


def ok(i):
    return {"question": f"q{i}", "solution": f"s{i}"}


# 1. values of the wrong type are named before Arrow sees them

def test_wrong_type_values_name_file_line_and_column(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [ok(1), ok(2), {"question": "q3", "solution": 5}])
    msg = error_of(src)
    assert msg.startswith(f"{src}, line 3: column 'solution' is a number (5); it takes text")
    src = write_jsonl(tmp_path / "listq.jsonl", [ok(1), {"question": ["a", "b"], "solution": "s"}])
    assert error_of(src).startswith(f"{src}, line 2: column 'question' is a list; it takes text")


def test_a_column_of_mixed_types_names_both_lines(tmp_path):
    src = write_jsonl(tmp_path / "meta.jsonl", [{**ok(1), "meta": "x"}, ok(2), {**ok(3), "meta": 7}])
    assert error_of(src).startswith(f"{src}, line 3: column 'meta' is a number (7) but text on line 1")


def test_drop_bad_rows_skips_wrong_types_and_bad_json(tmp_path, caplog):
    src = write_jsonl(tmp_path / "bad.jsonl", [ok(1), "{not json", {"question": "q3", "solution": 5}, ok(4),
                                               {**ok(5), "meta": "x"}, {**ok(6), "meta": [1]}])
    examples, _ = load(src, drop_bad_rows=True)
    assert [e.question for e in examples] == ["q1", "q4", "q5"]
    assert "dropped 3 bad line(s) (first lines: [2, 3, 6])" in caplog.text


# 2. columns that only later rows have are kept (None where a row lacks them)

def test_optional_columns_missing_from_the_first_row_are_kept(tmp_path):
    src = write_jsonl(tmp_path / "mixed.jsonl", [ok(1), {**ok(2), "reasoning_trace": "t2", "system": "S",
                                                         "answer": "42"}])
    ds, lines = load_table(src)
    assert ds.column_names == ["question", "solution", "reasoning_trace", "system", "answer"]
    assert ds[0]["reasoning_trace"] is None and ds[1]["answer"] == "42" and lines == [1, 2]
    examples, _ = load(src)
    assert examples[0].thought == "\n\ns1\n\n" and examples[0].system is None
    assert examples[1].thought == "\n\nt2\n\n" and examples[1].system == "S"


# 3. row errors use the file's own 1-based line numbers

def test_row_errors_name_the_file_line(tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", [ok(1), ok(2), {"question": "q3", "solution": ""}])
    assert error_of(src).startswith(f"{src}, line 3: empty, missing or non-text 'solution'")
    src = write_jsonl(tmp_path / "blank.jsonl", ["", "", ok(3), {"question": "q4"}])
    assert error_of(src).startswith(f"{src}, line 4: empty, missing or non-text 'solution'")
    examples, _ = load(src, drop_bad_rows=True, max_samples=5)
    assert [e.question for e in examples] == ["q3"]


# 4. unreadable .json / .csv files and empty folders

def test_malformed_json_and_csv_files_and_empty_folders(tmp_path):
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps(ok(1)) + '\n{"question": "q2"\n')
    assert error_of(str(lines)).startswith(f"{lines}, line 2: not valid JSON")
    doc = tmp_path / "doc.json"
    doc.write_text('[\n  {"question": "q1", "solution": "s1"},\n  {"question": "q2",, }\n]\n')
    assert error_of(str(doc)).startswith(f"{doc}: cannot read it as a .json file: line 3, column 21: not valid JSON")
    csv = tmp_path / "bad.csv"
    csv.write_text('question,solution\n"q1,s1\n')
    assert error_of(str(csv)).startswith(f"{csv}: cannot read it as a .csv file: ")
    for name in ("empty.json", "empty.csv"):
        (tmp_path / name).write_text("")
        assert error_of(str(tmp_path / name)) == f"{tmp_path / name}: empty file, no rows"
    (tmp_path / "folder").mkdir()
    assert error_of(str(tmp_path / "folder")).startswith(f"{tmp_path / 'folder'}: no data files in this directory")


# 5. local paths that do not exist, and built-in ids, never reach the hub

@pytest.mark.parametrize("source", ["results/no_such_distilled", "./no_such", "no_such.jsonl", "a/b/c"])
def test_missing_local_paths_say_no_such_file(tmp_path, monkeypatch, no_hub, source):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    assert error_of(source) == (f"dataset_id_or_path={source}: no such file or directory (relative to "
                                f"{tmp_path})")


def test_hub_ids_still_go_to_the_hub(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pytest.fail.Exception):
        load("some-org/some-data")
    assert no_hub == [("some-org/some-data", None)]   # the id, without a configuration


@pytest.mark.parametrize("raised, message", [
    (ConnectionError("Couldn't reach 'some-org/some-data' on the Hub (LocalEntryNotFoundError)\n  more"),
     "dataset_id_or_path=some-org/some-data: not a local path, and the hub could not give it (ConnectionError: "
     "Couldn't reach 'some-org/some-data' on the Hub (LocalEntryNotFoundError))"),
    (ValueError('Unknown split "tset". Should be one of [\'train\'].'),
     "dataset_split=tset: some-org/some-data has no such split (Unknown split \"tset\". Should be one of ['train'].)"),
])
def test_a_hub_failure_is_one_line(tmp_path, monkeypatch, raised, message):
    import datasets

    def refuse(*a, **k):
        raise raised

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    assert error_of("some-org/some-data", dataset_split="tset") == message


@pytest.mark.parametrize("source, start", [
    ("rlt-countdown:abc", "dataset_id_or_path=rlt-countdown:abc: write rlt-countdown:N:SEED (N >= 1"),
    ("rlt-countdown:0:0", "dataset_id_or_path=rlt-countdown:0:0: N=0 must be >= 1; write rlt-countdown:N:SEED"),
    ("rlt-arith", "dataset_id_or_path=rlt-arith: write rlt-arith:SPLIT:N:SEED"),
    ("rlt-arith:train:0:0", "dataset_id_or_path=rlt-arith:train:0:0: N=0 must be >= 1; write rlt-arith:SPLIT"),
    ("rlt-arith:train:5:0:max_terms-abc", "dataset_id_or_path=rlt-arith:train:5:0:max_terms-abc: rlt-arith: "
     "option 'max_terms-abc': max_terms takes an integer"),
    ("rlt-arith:train:5:0:merge_prob-x", "dataset_id_or_path=rlt-arith:train:5:0:merge_prob-x: rlt-arith: "
     "option 'merge_prob-x': merge_prob takes a number"),
])
def test_bad_builtin_ids_name_the_accepted_form(no_hub, source, start):
    assert error_of(source).startswith(start)


# 6. a split other than the default is refused where there are no splits

def test_a_split_is_refused_for_sources_without_splits(tmp_path):
    src = write_jsonl(tmp_path / "data.jsonl", [ok(1)])
    assert error_of(src, dataset_split="tset").startswith(
        f"dataset_split=tset: {src} is a single file, without splits; leave dataset_split at 'train'")
    assert error_of("rlt-countdown:2:0", dataset_split="test").startswith(
        "dataset_split=test: rlt-countdown:2:0 is a built-in dataset without splits")
    assert error_of("rlt-arith:train:2:0", dataset_split="test").startswith(
        "dataset_split=test: rlt-arith:train:2:0 has its split in the id")


def test_a_saved_dataset_names_its_splits(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([ok(1)])}).save_to_disk(str(tmp_path / "saved"))
    assert [e.question for e in load(str(tmp_path / "saved"))[0]] == ["q1"]
    assert error_of(str(tmp_path / "saved"), dataset_split="tset") == (
        f"dataset_split=tset: {tmp_path / 'saved'} has the splits ['train']")


def test_a_chat_template_that_alters_or_refuses_the_turns_is_one_line(tokenizer):
    """A template that rewrites the assistant's content (a Qwen3-like empty think block) or refuses a system turn
    (Gemma-like) is a ConfigError naming the tokenizer, not a traceback."""
    import copy

    from rlt.data.formats import resolve_format
    from rlt.data.text import check_end_of_turn, render_student_prompt, teacher_prompt

    fmt = resolve_format("custom")
    base = tokenizer.chat_template
    thinking = copy.deepcopy(tokenizer)
    thinking.chat_template = base.replace("+ message['content'] +", "+ ('<think>\n\n</think>\n\n' if message['role'] "
                                          "== 'assistant' else '') + message['content'] +")
    assert thinking.chat_template != base
    for call in (lambda: teacher_prompt(thinking, "q", "s", fmt), lambda: check_end_of_turn(thinking, fmt, "m")):
        with pytest.raises(ConfigError, match=r"the chat template of .* alters the assistant's content \(it renders "
                                              r"'<think>\\n\\n</think>"):
            call()
    no_system = copy.deepcopy(tokenizer)
    no_system.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}" + base)
    with pytest.raises(ConfigError, match=r"refused a system \+ user \+ assistant conversation \(TemplateError: "
                                          r"System role not supported\)"):
        render_student_prompt(no_system, "q", None, fmt)


def test_csv_columns_are_read_as_text(tmp_path):
    """pandas would type the columns: a solution `4` would be a number (refused as no text), an answer `007` the
    number 7 and, beside a blank cell, `4` would become `4.0`."""
    from rlt.eval import eval_rows

    data = tmp_path / "qa.csv"
    data.write_text('question,solution,answer\nWhat is 2+2?,4,007\nx?,"so \\boxed{5}",\nHalf?,"\\boxed{1/2}",4\n')
    examples, _ = load_dataset_examples(DataConfig(dataset_id_or_path=str(data)), FormatConfig())
    assert [ex.solution for ex in examples] == ["4", "so \\boxed{5}", "\\boxed{1/2}"]
    rows, _ = eval_rows(DataConfig(dataset_id_or_path=str(data)), FormatConfig())
    assert [r["answer"] for r in rows] == ["007", "5", "4"]
    # Excel's BOM, and pandas' to_csv() with its unnamed index column
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + data.read_bytes())
    (tmp_path / "index.csv").write_text(',question,solution,answer\n0,What is 2+2?,4,007\n')
    assert [r["answer"] for r in eval_rows(DataConfig(dataset_id_or_path=str(tmp_path / "bom.csv")),
                                           FormatConfig())[0]] == ["007", "5", "4"]
    assert [r["answer"] for r in eval_rows(DataConfig(dataset_id_or_path=str(tmp_path / "index.csv")),
                                           FormatConfig())[0]] == ["007"]


def test_a_system_turn_in_the_conversation_is_the_rows_system_prompt():
    from rlt.data.examples import RowError, parse_stratos_row
    from rlt.data.formats import resolve_format

    fmt = resolve_format("bespoke_stratos")
    answer = "<|begin_of_thought|>\n\nt\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\ns\n\n<|end_of_solution|>"
    turns = [{"from": "user", "value": "q"}, {"from": "assistant", "value": answer}]
    inline = [{"from": "system", "value": "MY SYSTEM PROMPT"}] + turns
    assert parse_stratos_row({"conversations": inline}, fmt).system == "MY SYSTEM PROMPT"
    assert parse_stratos_row({"conversations": inline, "system": "column"}, fmt).system == "column"
    assert parse_stratos_row({"conversations": turns}, fmt).system is None
    with pytest.raises(RowError, match=r"one system turn may come first\); found \['user', 'system', 'assistant'\]"):
        parse_stratos_row({"conversations": [turns[0], inline[0], turns[1]]}, fmt)


def test_custom_format_on_rows_without_a_question_column_names_the_source():
    with pytest.raises(ConfigError, match=r"^rlt-countdown:2:0 \(data_format=custom\): custom data needs a 'question' "
                                          r"\(or 'prompt' or 'problem'\) column; found columns \['system', "
                                          r"'conversations'"):
        load_dataset_examples(DataConfig(dataset_id_or_path="rlt-countdown:2:0"), FormatConfig(data_format="custom"))


def test_a_hub_dataset_with_several_configurations_takes_dataset_config(tmp_path, monkeypatch):
    """openai/gsm8k-like: without a configuration the hub refuses and lists them; the message names the key and the
    choices (they were on the error's second line, which was dropped), and dataset_config reaches the hub."""
    import datasets

    calls = []

    def hub(path, name=None, split=None):
        calls.append((path, name, split))
        if name not in ("main", "socratic"):
            raise ValueError("Config name is missing.\nPlease pick one among the available configs: ['main', "
                             "'socratic']\nExample of usage:\n\t`load_dataset('openai/gsm8k', 'main')`")
        return datasets.Dataset.from_list([{"question": "q", "answer": "4"}])

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", hub)
    assert error_of("openai/gsm8k") == ("dataset_id_or_path=openai/gsm8k has several configurations, ['main', "
                                        "'socratic']: give dataset_config=NAME")
    assert error_of("openai/gsm8k", dataset_config="mian").endswith("dataset_config=mian is not one of them")
    from rlt.data.loading import load_data_table

    ds, _ = load_data_table(DataConfig(dataset_id_or_path="openai/gsm8k", dataset_config="main"))
    assert calls[-1] == ("openai/gsm8k", "main", "train") and ds[0]["answer"] == "4"
    with pytest.raises(ConfigError, match=r"dataset_config=main: rlt-arith:train:2:0 has no configurations"):
        load_data_table(DataConfig(dataset_id_or_path="rlt-arith:train:2:0", dataset_config="main"))


def test_a_local_copy_of_a_dataset_with_configurations_takes_dataset_config(tmp_path):
    """A hub dataset's repository copied to an offline node: its README lists the configurations."""
    for name, q in (("main", "q1"), ("socratic", "q2")):
        write_jsonl((tmp_path / name).mkdir() or tmp_path / name / "train.jsonl", [{"question": q, "solution": "s"}])
    (tmp_path / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {n}\n  data_files:\n  - split: train\n    path: {n}/train.jsonl\n" for n in ("main", "socratic"))
        + "---\n")
    from rlt.data.loading import load_data_table

    assert error_of(str(tmp_path)) == (f"dataset_id_or_path={tmp_path} has several configurations, ['main', "
                                       "'socratic']: give dataset_config=NAME")
    assert error_of(str(tmp_path), dataset_config="x").endswith("dataset_config=x is not one of them")
    ds, _ = load_data_table(DataConfig(dataset_id_or_path=str(tmp_path), dataset_config="socratic"))
    assert ds[0]["question"] == "q2"


def test_cut_off_distilled_rows_are_counted_in_a_warning(tmp_path, caplog):
    """rlt.distill marks a cut-off explanation it kept (missing_end_tag=penalise) with end_tag false; training on
    such rows says how many there are."""
    from rlt.data.formats import FORMATS
    from rlt.data.text import stratos_row

    fmt = FORMATS["bespoke_stratos"]
    rows = [stratos_row(f"q{i}", f"step {i}", f"\\boxed{{{i}}}", "sys", fmt, end_tag=i != 1) for i in range(3)]
    with caplog.at_level("WARNING", logger="rlt.data.loading"):
        examples, _ = load(write_jsonl(tmp_path / "d.jsonl", rows))
    assert len(examples) == 3
    assert "1 of 3 rows hold a cut-off explanation (end_tag false" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="rlt.data.loading"):
        load(write_jsonl(tmp_path / "e.jsonl", [dict(r, end_tag=True) for r in rows]))
    assert "cut-off" not in caplog.text
