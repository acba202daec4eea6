"""Data layer: tokenizers, records → labels/masks, padding, packing, sampling, malformed records,
the reverse-word task and the embedded datasets. Single process, no model."""

from __future__ import annotations

import json
import logging
import math
import random
import string
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mrl.data import (
    IGNORE_INDEX, ByteTokenizer, Collator, DataConfig, DataError, GlobalBatchSampler, ReverseWordTask,
    build_data_loader, build_dataset, build_tokenizer, load_reward_fn, packed_attention_mask,
    packed_cu_seqlens,
)
from mrl.data.packing import pack_best_fit

BYTE = ByteTokenizer()


def write_jsonl(path: Path, lines: list) -> str:
    """Write records (dicts are JSON-encoded, strings written verbatim) one per line."""
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def rand_text(rng: random.Random, lo: int, hi: int) -> str:
    alphabet = string.ascii_letters + string.digits + " .,=!é€"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def reference_labels(tokens: list[int], first_target: int) -> tuple[list[int], list[float]]:
    """labels[t] = tokens[t+1] when t+1 >= first_target, else ignore; last position ignored."""
    labels, mask = [], []
    for t in range(len(tokens)):
        target = t + 1 < len(tokens) and t + 1 >= first_target
        labels.append(tokens[t + 1] if target else IGNORE_INDEX)
        mask.append(1.0 if target else 0.0)
    return labels, mask


# Tokenizers -----------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_and_layout():
    tok = build_tokenizer("byte")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    rng = random.Random(0)
    for _ in range(50):
        text = rand_text(rng, 0, 40)
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]) == text
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # a cut multi-byte character decodes, replaced
    with pytest.raises(ValueError, match="token id 259"):
        tok.decode([1, 259])


def test_hf_tokenizer_missing_package_and_files(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"'tokenizers' package.*mrl\[hf\]"):
        build_tokenizer(str(tmp_path))


def _make_hf_tokenizer(directory: Path, with_eos: bool = True) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [f"reverse {w}= {w[::-1]}" for w in ("abc", "hello", "world", "token", "reverse")] * 20
    tok.train_from_iterator(corpus, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "pad_token": {"content": "<pad>", "lstrip": False}}
    if with_eos:
        config["eos_token"] = "</s>"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def test_hf_tokenizer_from_directory(tmp_path):
    _make_hf_tokenizer(tmp_path / "tok")
    tok = build_tokenizer(str(tmp_path / "tok"))
    import tokenizers

    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (raw.token_to_id("<s>"), raw.token_to_id("</s>"),
                                                     raw.token_to_id("<pad>"))
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    for text in ("reverse hello= olleh", "abc xyz 123 é"):
        ids = tok.encode(text)
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text
    # An SFT record through the HF tokenizer: targets are exactly the response tokens + eos.
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "reverse hello=", "response": " olleh"}])
    ds = build_dataset(DataConfig(path=path, tokenizer=str(tmp_path / "tok"), seq_length=64), tok)
    ex = ds[0]
    prompt_ids, response_ids = tok.encode("reverse hello="), tok.encode(" olleh")
    assert ex.tokens.tolist() == [tok.bos_id] + prompt_ids + response_ids + [tok.eos_id]
    assert ex.labels[ex.loss_mask == 1].tolist() == response_ids + [tok.eos_id]

    _make_hf_tokenizer(tmp_path / "no_eos", with_eos=False)
    with pytest.raises(ValueError, match="eos_token"):
        build_tokenizer(str(tmp_path / "no_eos"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        build_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_tokenizer(str(tmp_path / "nowhere"))


# Records → examples ---------------------------------------------------------------------------


def test_sft_labels_and_masks_match_reference(tmp_path):
    rng = random.Random(1)
    records = []
    for i in range(40):
        if i % 4 == 3:
            records.append({"text": rand_text(rng, 1, 30)})
        else:
            records.append({"prompt": rand_text(rng, 0, 20), "response": rand_text(rng, 1, 20), "id": i})
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    ds = build_dataset(DataConfig(path=path, seq_length=128, shuffle=False))
    assert len(ds) == len(records) and ds.num_skipped == 0
    for i, rec in enumerate(records):
        ex = ds[i]
        if "text" in rec:
            tokens = [256] + list(rec["text"].encode()) + [257]
            first_target = 1
            response = list(rec["text"].encode()) + [257]
        else:
            prompt = list(rec["prompt"].encode())
            response = list(rec["response"].encode()) + [257]
            tokens = [256] + prompt + response
            first_target = 1 + len(prompt)
        labels, mask = reference_labels(tokens, first_target)
        assert ex.tokens.tolist() == tokens
        assert ex.labels.tolist() == labels
        assert ex.loss_mask.tolist() == mask
        assert ex.position_ids.tolist() == list(range(len(tokens)))
        assert ex.labels[ex.loss_mask == 1].tolist() == response  # the loss sees exactly the response
        assert ex.source == f"{ds.path}:{i + 1}"


def test_preference_pairs_share_prompt_and_mask_responses(tmp_path):
    rng = random.Random(2)
    records = [{"prompt": rand_text(rng, 1, 15), "chosen": rand_text(rng, 1, 10) + "a",
                "rejected": rand_text(rng, 1, 10) + "b"} for _ in range(10)]
    path = write_jsonl(tmp_path / "pref.jsonl", records)
    ds = build_dataset(DataConfig(kind="preference", path=path, seq_length=64))
    assert (len(ds), ds.num_units, ds.unit_size) == (20, 10, 2)
    for i, rec in enumerate(records):
        prompt = [256] + list(rec["prompt"].encode())
        for row, key in ((2 * i, "chosen"), (2 * i + 1, "rejected")):
            ex = ds[row]
            tokens = prompt + list(rec[key].encode()) + [257]
            labels, mask = reference_labels(tokens, len(prompt))
            assert ex.tokens.tolist() == tokens
            assert ex.labels.tolist() == labels and ex.loss_mask.tolist() == mask


def test_rollout_groups_rewards_and_logprobs_alignment(tmp_path):
    rng = np.random.default_rng(3)
    records = []
    for g in range(6):
        responses = [f"resp{g}-{j}" * (j + 1) for j in range(3)]
        truncated = [False, True, False]
        counts = [len(r.encode()) + (0 if cut else 1) for r, cut in zip(responses, truncated)]
        records.append({
            "prompt": f"question {g}?", "responses": responses, "rewards": rng.random(3).tolist(),
            "truncated": truncated, "logprobs": [(-rng.random(c)).tolist() for c in counts],
        })
    path = write_jsonl(tmp_path / "roll.jsonl", records)
    ds = build_dataset(DataConfig(kind="rollout", path=path, seq_length=64))
    assert (len(ds), ds.unit_size, ds.num_units) == (18, 3, 6)
    for g, rec in enumerate(records):
        prompt = [256] + list(rec["prompt"].encode())
        for j in range(3):
            ex = ds[3 * g + j]
            response = list(rec["responses"][j].encode()) + ([] if rec["truncated"][j] else [257])
            tokens = prompt + response
            labels, mask = reference_labels(tokens, len(prompt))
            assert ex.tokens.tolist() == tokens and ex.labels.tolist() == labels
            assert ex.loss_mask.tolist() == mask
            assert ex.group_id == g and ex.reward == pytest.approx(rec["rewards"][j])
            # Log-prob of response token k sits where labels holds response token k.
            expected = np.zeros(len(tokens), dtype=np.float32)
            expected[len(prompt) - 1 : len(tokens) - 1] = rec["logprobs"][j]
            np.testing.assert_array_equal(ex.behaviour_logprobs, expected)
    # Collated: per-row rewards and groups, log-probs padded with zeros like the loss mask.
    loader = build_data_loader(ds, global_batch_size=6, micro_batch_size=6, dp_rank=0, dp_size=1)
    batch = loader.next_step()[0]
    rows = batch.indices.tolist()
    assert sorted(r // 3 for r in rows) == sorted([rows[0] // 3] * 3 + [rows[3] // 3] * 3)
    assert batch.group_ids.tolist() == [r // 3 for r in rows]
    assert batch.rewards.tolist() == pytest.approx([records[r // 3]["rewards"][r % 3] for r in rows])
    assert batch.behaviour_logprobs.shape == batch.tokens.shape == (6, 64)
    for i, r in enumerate(rows):
        n = len(ds[r].tokens)
        assert batch.behaviour_logprobs[i, :n].tolist() == ds[r].behaviour_logprobs.tolist()
        assert (batch.behaviour_logprobs[i, n:] == 0).all()
    assert batch.num_loss_tokens == sum(ds[r].loss_mask.sum() for r in rows)
    assert batch.to("cpu").rewards.tolist() == batch.rewards.tolist()
    assert set(batch.as_dict()) == {"tokens", "labels", "loss_mask", "position_ids", "padding_mask", "indices",
                                    "rewards", "group_ids", "behaviour_logprobs"}
    prompts = build_dataset(DataConfig(kind="prompt", seq_length=32))
    with pytest.raises(TypeError, match="prompt datasets feed generation"):
        build_data_loader(prompts, global_batch_size=2, micro_batch_size=1, dp_rank=0, dp_size=1)


def test_truncation_policies(tmp_path):
    rec = {"prompt": "p" * 10, "response": "r" * 5}
    path = write_jsonl(tmp_path / "long.jsonl", [rec])
    with pytest.raises(DataError, match=r"long\.jsonl:1: sequence of 17 tokens exceeds data\.seq_length=12"):
        build_dataset(DataConfig(path=path, seq_length=12))
    left = build_dataset(DataConfig(path=path, seq_length=12, truncation="truncate_left_prompt"))[0]
    assert left.tokens.tolist() == [256] + [ord("p")] * 5 + [ord("r")] * 5 + [257]
    assert left.labels[left.loss_mask == 1].tolist() == [ord("r")] * 5 + [257]
    right = build_dataset(DataConfig(path=path, seq_length=14, truncation="truncate_right"))[0]
    assert right.tokens.tolist() == [256] + [ord("p")] * 10 + [ord("r")] * 3  # tail and eos lost
    assert right.labels[right.loss_mask == 1].tolist() == [ord("r")] * 3
    # Prompt-sharing: left truncation cuts the shared prompt by what the longer response needs.
    pref = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "p" * 10, "chosen": "c" * 6, "rejected": "r"}])
    ds = build_dataset(DataConfig(kind="preference", path=pref, seq_length=12, truncation="truncate_left_prompt"))
    assert ds[0].tokens.tolist() == [256] + [ord("p")] * 4 + [ord("c")] * 6 + [257]
    assert ds[1].tokens.tolist() == [256] + [ord("p")] * 4 + [ord("r"), 257]
    # Rollout log-probs are cut with the response under truncate_right.
    roll = write_jsonl(tmp_path / "roll.jsonl", [{"prompt": "pp", "responses": ["abcdef"], "rewards": [1.0],
                                                 "logprobs": [[-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7]]}])
    ex = build_dataset(DataConfig(kind="rollout", path=roll, seq_length=6, truncation="truncate_right"))[0]
    assert ex.tokens.tolist() == [256, ord("p"), ord("p"), ord("a"), ord("b"), ord("c")]
    np.testing.assert_allclose(ex.behaviour_logprobs, [0, 0, -0.1, -0.2, -0.3, 0], rtol=1e-6)
    # Nothing to learn from: the response does not fit even without a prompt, or the prompt fills all.
    with pytest.raises(DataError, match=r"long\.jsonl:1: response of 6 tokens does not fit"):
        build_dataset(DataConfig(path=path, seq_length=6, truncation="truncate_left_prompt"))
    with pytest.raises(DataError, match=r"long\.jsonl:1: the prompt alone \(11 tokens\)"):
        build_dataset(DataConfig(path=path, seq_length=10, truncation="truncate_right"))


def test_prompt_dataset_fits_prompts(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "abcdefgh", "answer": 42}])
    ex = build_dataset(DataConfig(kind="prompt", path=path, seq_length=16))[0]
    assert ex.tokens.tolist() == [256] + list(b"abcdefgh") and ex.answer == 42
    with pytest.raises(DataError, match=r"prompts\.jsonl:1: prompt of 9 tokens leaves no room"):
        build_dataset(DataConfig(kind="prompt", path=path, seq_length=8))
    cut = build_dataset(DataConfig(kind="prompt", path=path, seq_length=6, truncation="truncate_left_prompt"))[0]
    assert cut.tokens.tolist() == [256] + list(b"efgh")


# Collation ------------------------------------------------------------------------------------


def test_padding_to_seq_length_and_to_multiples(tmp_path):
    rng = random.Random(4)
    records = [{"prompt": rand_text(rng, 1, 10), "response": rand_text(rng, 1, 12)} for _ in range(12)]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    ds = build_dataset(DataConfig(path=path, seq_length=64))
    examples = [ds[i] for i in range(len(ds))]
    longest = max(len(e.tokens) for e in examples)
    for pad_to, multiple, expect in (("seq_length", 1, 64), ("longest", 1, longest),
                                     ("longest", 16, -(-longest // 16) * 16), ("longest", 32, 32 * -(-longest // 32))):
        batch = Collator(seq_length=64, pad_id=BYTE.pad_id, pad_to=pad_to, pad_to_multiple_of=multiple)(
            examples, list(range(len(ds))))
        assert batch.tokens.shape == (12, expect) and batch.tokens.dtype == torch.int64
        for i, e in enumerate(examples):
            n = len(e.tokens)
            assert batch.tokens[i, :n].tolist() == e.tokens.tolist()
            assert batch.labels[i, :n].tolist() == e.labels.tolist()
            assert (batch.tokens[i, n:] == BYTE.pad_id).all() and (batch.labels[i, n:] == IGNORE_INDEX).all()
            assert (batch.loss_mask[i, n:] == 0).all()
            assert batch.padding_mask[i].tolist() == [False] * n + [True] * (expect - n)
        assert batch.position_ids.tolist() == [list(range(expect))] * 12
        assert torch.equal(batch.loss_mask == 1, batch.labels != IGNORE_INDEX)
    with pytest.raises(ValueError, match="data.seq_length=64 is not a multiple of 48, the lcm of "
                                         "data.pad_to_multiple_of=16 and the parallel layout's 3"):
        DataConfig(path=path, seq_length=64, pad_to_multiple_of=16).aligned_to(3)
    assert DataConfig(path=path, seq_length=96, pad_to_multiple_of=4).aligned_to(6).pad_to_multiple_of == 12


def test_packing_positions_segments_and_masks(tmp_path):
    rng = random.Random(5)
    records = [{"prompt": rand_text(rng, 0, 12), "response": rand_text(rng, 1, 14)} for _ in range(30)]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    plain = build_dataset(DataConfig(path=path, seq_length=48))
    packed = build_dataset(DataConfig(path=path, seq_length=48, packing=True))
    assert sorted(i for p in packed.packs for i in p) == list(range(30))  # every example once
    assert len(packed) < len(plain)
    for row, docs in enumerate(packed.packs):
        ex = packed[row]
        assert len(ex.tokens) <= 48
        expect_pos, expect_seg = [], []
        for k, d in enumerate(docs):
            expect_pos += list(range(len(plain[d].tokens)))
            expect_seg += [k + 1] * len(plain[d].tokens)
        assert ex.position_ids.tolist() == expect_pos and ex.segment_ids.tolist() == expect_seg
        assert ex.tokens.tolist() == sum((plain[d].tokens.tolist() for d in docs), [])
        assert ex.labels.tolist() == sum((plain[d].labels.tolist() for d in docs), [])  # no cross-document target
    batch = Collator(seq_length=48, pad_id=BYTE.pad_id)([packed[r] for r in range(len(packed))], range(len(packed)))
    assert batch.segment_ids.shape == (len(packed), 48)
    assert batch.loss_mask.sum().item() == sum(plain[i].loss_mask.sum() for i in range(30))
    seg = batch.segment_ids
    mask = packed_attention_mask(seg)  # True = masked
    b, s = seg.shape
    ref = torch.ones(b, 1, s, s, dtype=torch.bool)
    for i in range(b):
        for q in range(s):
            for k in range(q + 1):
                if seg[i, q] == seg[i, k]:
                    ref[i, 0, q, k] = False
    assert torch.equal(mask, ref)
    bounds, flat = [0], seg.reshape(-1).tolist()
    for t in range(1, b * s):
        if t % s == 0 or flat[t] != flat[t - 1]:
            bounds.append(t)
    bounds.append(b * s)
    assert packed_cu_seqlens(seg).tolist() == bounds and packed_cu_seqlens(seg).dtype == torch.int32


def test_pack_best_fit_respects_capacity():
    rng = random.Random(6)
    lengths = [rng.randint(1, 50) for _ in range(300)]
    bins = pack_best_fit(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= math.ceil(sum(lengths) / 64) * 1.25  # near the lower bound
    assert pack_best_fit(lengths, 64) == bins
    with pytest.raises(ValueError):
        pack_best_fit([65], 64)


# Sampling -------------------------------------------------------------------------------------


def _sampler(rank, dp, num_units=37, unit=1, gbs=8, mbs=2, seed=7, **kw):
    return GlobalBatchSampler(num_units=num_units, unit_size=unit, global_batch_size=gbs, micro_batch_size=mbs,
                              dp_rank=rank, dp_size=dp, seed=seed, **kw)


def test_sampler_dp_shards_cover_each_global_batch_once_and_epochs_fully():
    dp, steps = 2, 40
    samplers = [_sampler(r, dp) for r in range(dp)]
    stream = []
    for _ in range(steps):
        per_rank = [s.next_step() for s in samplers]
        assert all(len(mbs) == 2 and all(len(mb) == 2 for mb in mbs) for mbs in per_rank)
        rows = [r for mbs in per_rank for mb in mbs for r in mb]
        assert len(rows) == 8
        stream += rows
    # The concatenated stream is epoch after epoch of permutations: nothing dropped or repeated.
    for e in range(len(stream) // 37):
        epoch = stream[e * 37:(e + 1) * 37]
        assert sorted(epoch) == list(range(37))
    assert stream[:37] != list(range(37))  # shuffled
    assert stream[:37] != stream[37:74]  # reshuffled per epoch
    assert [s.state_dict() for s in samplers][0] == samplers[1].state_dict()
    assert samplers[0].consumed_rows == steps * 8


def test_sampler_deterministic_and_resumable_across_dp_sizes():
    a = _sampler(0, 1, gbs=8, mbs=4)
    first = [a.next_step() for _ in range(7)]
    again = _sampler(0, 1, gbs=8, mbs=4)
    assert [again.next_step() for _ in range(7)] == first
    assert [_sampler(0, 1, gbs=8, mbs=4, seed=8).next_step() for _ in range(7)] != first
    state = a.state_dict()
    cont = [a.next_step() for _ in range(9)]
    resumed = _sampler(0, 1, gbs=8, mbs=4)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert [resumed.next_step() for _ in range(9)] == cont
    # The same position on 4 ranks: their shards, concatenated, are the single rank's global batch.
    ranks = [_sampler(r, 4, gbs=8, mbs=1) for r in range(4)]
    for s in ranks:
        s.load_state_dict(state)
    for step in cont:
        shards = [s.next_step() for s in ranks]
        assert [row for mbs in shards for mb in mbs for row in mb] == step[0] + step[1]
    with pytest.raises(ValueError, match="checkpoint has num_units=37, this run has num_units=36"):
        _sampler(0, 1, num_units=36).load_state_dict(state)
    assert _sampler(0, 1, shuffle=False).next_step() == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_sampler_keeps_pairs_in_micro_batches_and_groups_in_global_batches():
    for rank in range(2):
        s = _sampler(rank, 2, num_units=11, unit=2, gbs=8, mbs=2, unit_in_micro_batch=True)
        for _ in range(20):
            for mb in s.next_step():
                assert mb[0] % 2 == 0 and mb[1] == mb[0] + 1  # chosen then its rejected
    groups = [_sampler(r, 2, num_units=9, unit=4, gbs=8, mbs=1) for r in range(2)]
    for _ in range(20):
        rows = [row for s in groups for mb in s.next_step() for row in mb]
        counts = Counter(row // 4 for row in rows)
        assert all(c % 4 == 0 for c in counts.values())  # whole groups only
    with pytest.raises(ValueError, match="micro_batch_size=3 is not a multiple of the dataset's unit of 2"):
        _sampler(0, 1, unit=2, gbs=6, mbs=3, unit_in_micro_batch=True)
    with pytest.raises(ValueError, match="global_batch_size=8 is not a multiple of the dataset's unit of 3"):
        _sampler(0, 1, unit=3, gbs=8, mbs=2)
    with pytest.raises(ValueError, match="global_batch_size=8 is not divisible by micro_batch_size=2 × dp=3"):
        _sampler(0, 3, gbs=8, mbs=2)


def test_data_loader_resume_gives_identical_batches():
    ds = build_dataset(DataConfig(kind="preference", path="builtin:reverse_preference", seq_length=32,
                                  pad_to="longest", max_records=50))
    loader = build_data_loader(ds, global_batch_size=8, micro_batch_size=4, dp_rank=1, dp_size=2,
                               pad_to_multiple_of=8)
    for _ in range(5):
        loader.next_step()
    state = loader.state_dict()
    expected = [loader.next_step() for _ in range(4)]
    fresh = build_data_loader(ds, global_batch_size=8, micro_batch_size=4, dp_rank=1, dp_size=2,
                              pad_to_multiple_of=8)
    fresh.load_state_dict(state)
    for want in expected:
        got = fresh.next_step()
        assert len(got) == 1
        for g, w in zip(got, want):
            assert g.tokens.shape[1] % 8 == 0
            for name in ("tokens", "labels", "loss_mask", "position_ids", "indices"):
                assert torch.equal(getattr(g, name), getattr(w, name))
            assert (g.indices[0::2] % 2 == 0).all() and torch.equal(g.indices[1::2], g.indices[0::2] + 1)
    with pytest.raises(ValueError, match="data.seq_length=32 is not a multiple of 12"):
        build_data_loader(ds, global_batch_size=8, micro_batch_size=4, dp_rank=0, dp_size=1, pad_to_multiple_of=12)


# Malformed records ----------------------------------------------------------------------------

GOOD = {
    "sft": {"prompt": "p", "response": "r"},
    "preference": {"prompt": "p", "chosen": "a", "rejected": "b"},
    "rollout": {"prompt": "p", "responses": ["a", "bc"], "rewards": [0.0, 1.0]},
}

MALFORMED = [  # (kind, bad line, expected message after "path:line: ")
    ("sft", '{"prompt": "p", "response": "r"', "invalid JSON: Expecting ',' delimiter"),
    ("sft", '["prompt", "response"]', "a record must be a JSON object, got array"),
    ("sft", {"prompt": "p"}, "missing field 'response'"),
    ("sft", {"question": "p"}, "an SFT record needs 'prompt' and 'response', or 'text'"),
    ("sft", {"prompt": 3, "response": "r"}, "field 'prompt' must be a string, got number"),
    ("sft", {"prompt": "p", "response": ""}, "field 'response' is empty"),
    ("sft", {"text": "t", "prompt": "p"}, "an SFT record has either 'text' or 'prompt'/'response', not both"),
    ("sft", {"prompt": "p" * 30, "response": "r"}, "sequence of 33 tokens exceeds data.seq_length=16"),
    ("preference", {"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "a"}, "'chosen' and 'rejected' are identical"),
    ("rollout", {"prompt": "p", "responses": ["a", "b"], "rewards": [1.0]},
     "field 'rewards' has 1 entries but 'responses' has 2"),
    ("rollout", {"prompt": "p", "responses": ["a", ""], "rewards": [1, 0]}, "responses[1] is empty"),
    ("rollout", {"prompt": "p", "responses": ["a", "b"], "rewards": [1, True]},
     "rewards[1] must be a number, got boolean"),
    ("rollout", '{"prompt": "p", "responses": ["a", "b"], "rewards": [NaN, 1]}', "rewards[0] must be finite, got nan"),
    ("rollout", {"prompt": "p", "responses": "a", "rewards": [1]}, "field 'responses' must be an array, got string"),
    ("rollout", {"prompt": "p", "responses": ["a", "b", "c"], "rewards": [1, 0, 0]},
     "record has 3 responses but the group size is 2"),
    ("rollout", {"prompt": "p", "responses": ["a", "b"], "rewards": [1, 0], "logprobs": [[-1.0, -1.0], [-1.0]]},
     "record has 'logprobs' but earlier records do not"),
    ("rollout", {"prompt": "p", "responses": ["a", "b"], "rewards": [1, 0], "truncated": [False, "no"]},
     "truncated[1] must be a boolean, got 'no'"),
]


@pytest.mark.parametrize("kind,bad,message", MALFORMED)
def test_malformed_record_names_file_and_line(tmp_path, kind, bad, message):
    lines = [GOOD[kind], "", GOOD[kind], "   ", bad, GOOD[kind]]  # blank lines still count as lines
    path = write_jsonl(tmp_path / f"{kind}.jsonl", lines)
    with pytest.raises(DataError) as info:
        build_dataset(DataConfig(kind=kind, path=path, seq_length=16))
    assert str(info.value).startswith(f"{path}:5: {message}")
    assert (info.value.path, info.value.line) == (path, 5)
    assert isinstance(info.value, ValueError)
    skipping = build_dataset(DataConfig(kind=kind, path=path, seq_length=16, skip_malformed=True))
    assert skipping.num_skipped == 1 and skipping.num_units == 3
    assert str(skipping.skipped[0]).startswith(f"{path}:5: {message}")


def test_logprob_records_checked_against_tokenized_responses(tmp_path):
    base = {"prompt": "p", "responses": ["ab", "c"], "rewards": [1, 0], "truncated": [False, True]}
    cases = [
        ({"logprobs": [[-1.0, -1.0], [-1.0]]}, "logprobs[0] has 2 entries but response 0 has 2 tokens + eos"),
        ({"logprobs": [[-1.0, -1.0, -1.0], [-1.0, -2.0]]}, "logprobs[1] has 2 entries but response 1 has 1 tokens"),
        ({"logprobs": [[-1.0, -1.0, 0.5], [-1.0]]}, "logprobs[0] holds 0.5 > 0"),
        ({"logprobs": [[-1.0, -1.0, -1.0]]}, "field 'logprobs' has 1 entries but 'responses' has 2"),
        ({"logprobs": [[-1.0, -1.0, -1.0], -1.0]}, "logprobs[1] must be an array, got number"),
        ({}, "record lacks 'logprobs' but earlier records have them"),
    ]
    good = dict(base, logprobs=[[-1.0, -2.0, -3.0], [-4.0]])
    for extra, message in cases:
        path = write_jsonl(tmp_path / "roll.jsonl", [good, dict(base, **extra)])
        with pytest.raises(DataError) as info:
            build_dataset(DataConfig(kind="rollout", path=path, seq_length=16))
        assert str(info.value).startswith(f"{path}:2: {message}"), str(info.value)


def test_skip_malformed_counts_every_bad_record(tmp_path, caplog):
    lines = [GOOD["sft"], "{oops", {"prompt": "p"}, GOOD["sft"], {"text": ""}, "\xff\xfe", GOOD["sft"]]
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, lines)
    raw = path.read_bytes().replace("ÿþ".encode("utf-8"), b"\xff\xfe")  # line 6: invalid UTF-8
    path.write_bytes(raw)
    with pytest.raises(DataError, match=rf"mixed\.jsonl:2: invalid JSON"):
        build_dataset(DataConfig(path=str(path)))
    with caplog.at_level(logging.WARNING, logger="mrl.data.records"):
        ds = build_dataset(DataConfig(path=str(path), skip_malformed=True))
    assert len(ds) == 3 and ds.num_skipped == 4
    assert [s.line for s in ds.skipped] == [2, 3, 5, 6]
    assert "invalid UTF-8" in ds.skipped[3].reason and "field 'text' is empty" == ds.skipped[2].reason
    assert "skipped 4 malformed record(s)" in caplog.text
    assert [ds[i].source for i in range(3)] == [f"{path}:1", f"{path}:4", f"{path}:7"]
    all_bad = write_jsonl(tmp_path / "bad.jsonl", ["{", "{"])
    with pytest.raises(DataError, match=r"bad\.jsonl: no valid records \(2 skipped as malformed\)"):
        build_dataset(DataConfig(path=all_bad, skip_malformed=True))
    with pytest.raises(DataError, match="data file not found"):
        build_dataset(DataConfig(path=str(tmp_path / "missing.jsonl")))
    assert len(build_dataset(DataConfig(path=str(path), skip_malformed=True, max_records=3))) == 1


def test_data_config_validation_names_fields():
    cases = [
        (dict(kind="pretrain"), "kind must be one of"),
        (dict(seq_length=0), "seq_length must be a positive integer"),
        (dict(seq_length=30, pad_to_multiple_of=16),
         "seq_length=30 is not a multiple of pad_to_multiple_of=16"),
        (dict(kind="preference", path="x.jsonl", packing=True), "packing applies to kind='sft' only"),
        (dict(truncation="middle"), "truncation must be one of"),
        (dict(pad_to="max"), "pad_to must be one of"),
        (dict(path="builtin:nope"), "path='builtin:nope' names no embedded dataset"),
        (dict(kind="preference", path="builtin:reverse_sft"), "holds 'sft' records but kind='preference'"),
        (dict(group_size=4), "group_size applies to kind='rollout' only"),
        (dict(max_records=0), "max_records must be a positive integer"),
        (dict(seed=-1), "seed must be a non-negative integer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            DataConfig(**kwargs)


# Task and reward functions --------------------------------------------------------------------


def reference_credit(text: str, target: str) -> float:
    """Independent Wordle-style scoring: exact positions 1, other characters still present 0.5."""
    if not text and not target:
        return 0.0
    remaining = list(target)
    score = 0.0
    exact = [i < len(target) and c == target[i] for i, c in enumerate(text)]
    for i, hit in enumerate(exact):
        if hit:
            score += 1.0
            remaining.remove(text[i])
    for i, c in enumerate(text):
        if not exact[i] and c in remaining:
            score += 0.5
            remaining.remove(c)
    return score / max(len(text), len(target))


def test_reverse_word_task_partial_credit():
    task = ReverseWordTask()
    assert task.reward("reverse abc=", "cba") == 1.0
    assert task.reward("reverse abc=", " cba \nmore text") == 1.0  # first line, stripped
    assert task.reward("reverse abc=", "abc") == pytest.approx((1 + 0.5 * 2) / 3)  # copy: b exact, a/c misplaced
    assert task.reward("reverse abc=", "cbaxx") == pytest.approx(3 / 5)  # overlong answers lose credit
    assert task.reward("reverse abc=", "cb") == pytest.approx(2 / 3)
    assert task.reward("reverse abc=", "") == 0.0
    assert task.reward("reverse abc=", "zzz") == 0.0
    assert task.reward("reverse abc=", "xyz", answer="xyz") == 1.0
    rng = random.Random(9)
    for _ in range(300):
        word = task.random_word(rng)
        text = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(0, 7)))
        assert task.reward(f"reverse {word}=", text) == pytest.approx(reference_credit(text, word[::-1]))
    # Random letter strings: non-zero and varying rewards, all in [0, 1].
    values = [task.reward(p.prompt, "".join(rng.choice(string.ascii_lowercase) for _ in range(4)))
              for p in task.prompts(200, seed=10)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert sum(v > 0 for v in values) > 50 and len(set(values)) >= 4
    prompts = task.prompts(20, seed=3)
    assert prompts == task.prompts(20, seed=3) and prompts != task.prompts(20, seed=4)
    assert all(task.answer_for(p.prompt) == p.answer for p in prompts)
    with pytest.raises(ValueError, match="not a reverse-word prompt"):
        task.reward("add 1+2=", "3")


def _two_args(prompt, completion):
    return float(len(completion))


def _nan_reward(prompt, completion, answer):
    return float("nan")


def test_load_reward_fn():
    fn = load_reward_fn("mrl.data.tasks:reverse_word_reward")
    assert fn("reverse abc=", "cba") == 1.0 and fn("reverse abc=", "abc", None) == pytest.approx(2 / 3)
    two = load_reward_fn("tests.test_data:_two_args")
    assert two("p", "abc", "ignored") == 3.0
    with pytest.raises(ValueError, match="returned nan"):
        load_reward_fn("tests.test_data:_nan_reward")("p", "c")
    with pytest.raises(ValueError, match="'package.module:function'"):
        load_reward_fn("mrl.data.tasks")
    with pytest.raises(ImportError, match="no_such_module"):
        load_reward_fn("no_such_module:f")
    with pytest.raises(AttributeError, match="has no attribute 'missing'"):
        load_reward_fn("mrl.data.tasks:missing")
    with pytest.raises(TypeError, match="is not callable"):
        load_reward_fn("mrl.data.sequences:IGNORE_INDEX")


# Embedded datasets ----------------------------------------------------------------------------


def test_builtin_datasets_regenerate_identically_and_load_cleanly(tmp_path):
    from mrl.data.builtin import make_builtin

    shipped = Path(make_builtin.__file__).parent
    total = 0
    for path in make_builtin.write(tmp_path):
        assert path.read_bytes() == (shipped / path.name).read_bytes(), path.name
        total += path.stat().st_size
    assert total < 300_000
    task = ReverseWordTask()
    for name, kind in (("reverse_sft", "sft"), ("reverse_preference", "preference"),
                       ("reverse_rollout", "rollout"), ("reverse_prompts", "prompt")):
        ds = build_dataset(DataConfig(kind=kind, path=f"builtin:{name}", seq_length=32))
        assert ds.num_skipped == 0 and len(ds) > 0
        default = build_dataset(DataConfig(kind=kind, seq_length=32))  # data.path: null
        assert default.path == ds.path == str(shipped / f"{name}.jsonl") and len(default) == len(ds)
    for line in (shipped / "reverse_sft.jsonl").read_text().splitlines()[:100]:
        rec = json.loads(line)
        assert task.reward(rec["prompt"], rec["response"]) == 1.0
    for line in (shipped / "reverse_rollout.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert rec["rewards"] == [task.reward(rec["prompt"], r) for r in rec["responses"]]
    for line in (shipped / "reverse_preference.jsonl").read_text().splitlines()[:100]:
        rec = json.loads(line)
        assert task.reward(rec["prompt"], rec["chosen"]) == 1.0 > task.reward(rec["prompt"], rec["rejected"])


# Packed rows through the model ----------------------------------------------------------------


def case_packed_attention_isolates_documents(tp: int, position_embedding: str):
    """Logits of a packed row under packed_attention_mask equal each document run alone."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from mrl.model.builder import build_model
    from mrl.model.config import ModelConfig, PrecisionConfig
    from mrl.parallel.layout import ParallelConfig, ParallelLayout

    layout = ParallelLayout.initialize(ParallelConfig(tp=tp), timeout_minutes=2)
    layout.seed(1)
    cfg = ModelConfig(vocab_size=259, max_sequence_length=64, position_embedding=position_embedding)
    model = build_model(cfg, PrecisionConfig(), layout, "cpu")[0].eval()
    packed = build_dataset(DataConfig(path="builtin:reverse_sft", seq_length=64, packing=True, max_records=40))
    plain = build_dataset(DataConfig(path="builtin:reverse_sft", seq_length=64, max_records=40))
    batch = Collator(seq_length=64, pad_id=BYTE.pad_id)([packed[0], packed[1]], [0, 1])

    def logits(tokens, positions, mask):
        with torch.no_grad():
            return gather_from_tensor_model_parallel_region(model(tokens, positions, mask), group=layout.tp_group)

    causal = torch.ones(1, 1, 64, 64, dtype=torch.bool).triu(1)
    isolated = logits(batch.tokens, batch.position_ids, packed_attention_mask(batch.segment_ids))
    leaky = logits(batch.tokens, batch.position_ids, causal)
    diffs, leaks = [], []  # leaks: (document's place in its row, max logit difference)
    for row in range(2):
        offset = 0
        for place, doc in enumerate(packed.packs[row]):
            tokens = torch.from_numpy(plain[doc].tokens)[None]
            n = tokens.shape[1]
            alone = logits(tokens, torch.arange(n)[None], causal[:, :, :n, :n])
            diffs.append((isolated[row, offset:offset + n] - alone[0]).abs().max().item())
            leaks.append((place, (leaky[row, offset:offset + n] - alone[0]).abs().max().item()))
            offset += n
    return diffs, leaks


@pytest.mark.parametrize("position_embedding", ["rope", "learned_absolute"])
def test_packed_attention_mask_isolates_documents_in_the_model(ranks2, position_embedding):
    for diffs, leaks in ranks2.run(case_packed_attention_isolates_documents, 2, position_embedding):
        assert max(diffs) < 1e-5
        # Plain causal: a row's first document is unaffected, later ones see the earlier ones.
        assert all((diff < 1e-5) == (place == 0) for place, diff in leaks)
        assert sum(place > 0 for place, _ in leaks) >= 2
