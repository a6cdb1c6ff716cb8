"""Training / evaluation data: the release's JSONL records -> TFDS ArrayRecord -> grain batches.

- `records`: `parse_record(obj, source=...) -> Record`, `read_jsonl(path)`, `RecordError(reason)`.
- `prepare`: `prepare(files, image_root, out, strict=, image_size=)` (= `pam-jax data prepare`).
- `preprocess`: `make_example(record, images, tokenizer, cfg, rng) -> Example`, the one record ->
  model-inputs path shared by the trainer and the evaluators (`PreprocessConfig`).
- `batch`: `collate(examples, seq_bucket=...) -> Batch` (static shapes, numpy);
  `collate_packed(examples, rows, pack_max=...)` and `FirstFit` for packed rows.
- `packing`: the grain stage that packs the stream (`make_dataset(..., pack=True)`).
- `pipeline`: `make_dataset(spec, tokenizer=, cfg=, batch_size=, seed=, shuffle=, augment=,
  process_index=, process_count=, pack=, worker_count=)` -> grain IterDataset of Batch
  (orbax-saveable iterator).
- `source`: prepared dataset folders and JSONL files as random-access sources.
"""
