"""`pam-jax data prepare` / `pam-jax data inspect` end to end (in process)."""

from __future__ import annotations

import json

from PIL import Image

from pam_jax.cli import main

from .conftest import image_record, video_record, write_jsonl


def test_prepare_inspect_and_strict(tmp_path, image_root, tokenizer, capsys):
    rows = [image_record(f"img{i}.jpg") for i in range(3)] + [video_record(), "{oops"]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    out = tmp_path / "ds"
    args = ["data", "prepare", "--jsonl", str(jsonl), "--image-root", str(image_root)]
    assert main([*args, "--out", str(out), "--workers", "1"]) == 0
    rep = json.loads((out / "prepare_report.json").read_text())
    assert (rep["records_read"], rep["written"], rep["skipped_count"]) == (5, 4, 1)
    assert rep["skipped"][0]["line"] == 5 and rep["skipped"][0]["file"] == str(jsonl)
    said = capsys.readouterr().out
    assert "4 of 5 records written" in said and "malformed_json" in said

    assert main([*args, "--out", str(out)]) == 2  # not empty, no --force
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "strict"), "--strict"]) == 2
    assert "a.jsonl:5" in capsys.readouterr().err and not (tmp_path / "strict").exists()

    png = tmp_path / "sheet.png"
    assert main(["data", "inspect", str(out), "--out", str(png), "--samples", "3"]) == 0
    text = capsys.readouterr().out
    assert "4 records" in text and "'video': 1" in text and "malformed_json" in text
    assert Image.open(png).size == (3 * 320, 440)
    assert main(["data", "inspect", str(tmp_path)]) == 2

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tokenizer.tok.save(str(tok_dir / "tokenizer.json"))
    assert main(["data", "inspect", str(out), "--tokenizer", str(tok_dir)]) == 0
    text = capsys.readouterr().out
    assert "LLM sequence length (image): min 11" in text and "supervised tokens" in text
