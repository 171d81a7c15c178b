"""evaluate --resume over more samples than the checkpoints hold answers only the new ones, and a run written before
checkpoints named their samples is reused where its samples come first."""

import pytest

import polykv_search as pk
from polykv_search.checkpoints import checkpoint_file, fingerprint_digest, samples_digest
from polykv_search.data import load_samples
from polykv_search.engine import PrefillEngine
from polykv_search.errors import ProfileError
from polykv_search.io import read_sealed_json, write_sealed_json
from tests.conftest import sample_rows, tiny_loaded, write_jsonl


def counting_prefills(monkeypatch) -> list[str]:
    seen = []
    prefill = PrefillEngine.prefill

    def counted(self, sample, *args, **kwargs):
        seen.append(sample.id)
        return prefill(self, sample, *args, **kwargs)

    monkeypatch.setattr(PrefillEngine, "prefill", counted)
    return seen


def test_more_samples_answer_only_the_new_ones(tmp_path, monkeypatch):
    lm = tiny_loaded("llama")
    data = write_jsonl(tmp_path / "e.jsonl", sample_rows(3, words=150))
    args = {"policies": ["snapkv"], "budgets": [16], "allocators": (), "out_dir": tmp_path / "ev"}
    first = pk.evaluate(lm, data, max_samples=2, **args)
    seen = counting_prefills(monkeypatch)
    grown = pk.evaluate(lm, data, resume=True, **args)
    assert seen == ["s2"]
    fresh = pk.evaluate(lm, data, **{**args, "out_dir": tmp_path / "fresh"})
    assert [(r.sample_id, r.method, r.answer) for r in grown.results] == \
        [(r.sample_id, r.method, r.answer) for r in fresh.results]
    assert grown.results[:len(first.results)] == first.results


def test_a_run_from_before_checkpoints_named_their_samples_is_reused_by_sample(tmp_path, monkeypatch):
    lm = tiny_loaded("llama")
    rows = sample_rows(3, words=150)
    data = write_jsonl(tmp_path / "e.jsonl", rows)
    older = write_jsonl(tmp_path / "older.jsonl", [rows[0], rows[2]])  # not the first ones: reused by sample
    args = {"policies": ["snapkv"], "budgets": [16], "allocators": (), "out_dir": tmp_path / "ev"}
    pk.evaluate(lm, older, **args)
    ckpt = tmp_path / "ev" / "checkpoints"
    old = {k: v for k, v in read_sealed_json(ckpt / "run.json").items() if k != "checkpoints"}
    old["samples"] = samples_digest(load_samples(older))  # what an older version wrote: files named by position
    write_sealed_json(ckpt / "run.json", old)
    for index, sample in enumerate(load_samples(older)):
        path = ckpt / checkpoint_file(sample, ".json")
        write_sealed_json(ckpt / f"sample-{index:05d}.json", {"run": fingerprint_digest(old),
                                                              "rows": read_sealed_json(path)["rows"]})
        path.unlink()
    seen = counting_prefills(monkeypatch)
    grown = pk.evaluate(lm, data, resume=True, **args)
    assert seen == ["s1"]
    pk.evaluate(lm, data, resume=True, **args)  # run.json now names them
    assert seen == ["s1"]
    fresh = pk.evaluate(lm, data, **{**args, "out_dir": tmp_path / "fresh"})
    assert [(r.sample_id, r.method, r.answer) for r in grown.results] == \
        [(r.sample_id, r.method, r.answer) for r in fresh.results]
    write_sealed_json(ckpt / "run.json", old)
    with pytest.raises(ProfileError, match="made with a different samples"):  # s2 is not among them
        pk.evaluate(lm, write_jsonl(tmp_path / "other.jsonl", rows[:2]), resume=True, **args)
