"""Incremental decoding (m2train.models.decoding) equals the full forward; generation (m2train.models.generation)
and `m2train generate` on an exported model."""

import json
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import tiny_model_cfg
from data_fixtures import TEXTS, train_sentencepiece
from m2train.cli import main as cli_main
from m2train.models import build_model, save_pretrained
from m2train.models.decoding import DecodeLengthError
from m2train.models.generation import SamplingConfig, filter_logits, generate

# (arch, overrides): every mixer / block variant a causal LM can be built with.
VARIANTS = {
    "m2_gpt": ("m2_gpt", {}),
    "no_residual_conv_input_norm": ("m2_gpt", dict(residual_long_conv=False, mixer_input_norm=True)),
    "short_conv_1_dense_glu": ("m2_gpt", dict(short_conv_kernel=1, mlp_type="dense")),
    "short_conv_5_monarch_glu_positions": ("m2_gpt", dict(short_conv_kernel=5, mlp_type="monarch",
                                                          position_embeddings=True)),
    "monarch_causal": ("m2_gpt", dict(sequence_mixer="monarch_causal")),
    "gpt": ("gpt", {}),
}


def _model(variant, dtype=torch.float64, **extra):
    arch, overrides = VARIANTS[variant]
    model = build_model(tiny_model_cfg(arch, **{**overrides, **extra})).to(dtype).eval()
    with torch.no_grad():      # D skips and biases away from their zero/one inits, so every term counts
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _decode_in_pieces(model, ids, pieces):
    """Logits of `ids` decoded as consecutive chunks of the given sizes (the prompt, single tokens, a chunk
    after a history)."""
    state = model.new_decode_state(ids.shape[0], ids.shape[1] + 2)
    out, t = [], 0
    for n in pieces:
        out.append(model.decode(ids[:, t:t + n], state))
        t += n
    assert t == ids.shape[1] and state.length == t
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_incremental_decoding_equals_full_forward_fp64(variant):
    model = _model(variant)
    ids = torch.randint(0, 101, (3, 30))
    with torch.no_grad():
        full = model(ids).logits
        inc = _decode_in_pieces(model, ids, [7] + [1] * 10 + [4] + [1] * 9)
    err = (inc - full).abs().max() / full.abs().max()
    assert err < 1e-12, f"{variant}: rel err {err:.2e}"
    # Changing a later token changes nothing before it (the cached path is causal too).
    ids2 = ids.clone()
    ids2[:, 20] = (ids2[:, 20] + 1) % 101
    with torch.no_grad():
        inc2 = _decode_in_pieces(model, ids2, [20] + [1] * 10)
        before = _decode_in_pieces(model, ids, [20] + [1] * 10)[:, :20]
    # (Bitwise for the FFT conv; the Monarch operator's causality is exact in math, to rounding in fp64.)
    assert (inc2[:, :20] - before).abs().max() / before.abs().max() < 1e-13
    assert not torch.allclose(inc2[:, 20:], inc[:, 20:])


def test_incremental_decoding_fp32_and_bf16_histories():
    """fp32: equal to the full forward to fp32 rounding. bf16: the long-conv histories stay fp32 (the FFT
    path's convolution dtype), so the cached path stays as close to the full bf16 forward as that one is to
    fp32."""
    model = _model("m2_gpt", torch.float32)
    ids = torch.randint(0, 101, (2, 24))
    with torch.no_grad():
        full = model(ids).logits
        inc = _decode_in_pieces(model, ids, [5] + [1] * 19)
        assert (inc - full).abs().max() / full.abs().max() < 1e-5
        state = model.to(torch.bfloat16).new_decode_state(2, 24)
        assert state.caches[0].v.dtype == torch.float32 and state.caches[0].z_tail.dtype == torch.bfloat16
        inc16 = torch.cat([model.decode(ids[:, :5], state)] + [model.decode(ids[:, t:t + 1], state)
                                                                  for t in range(5, 24)], dim=1).float()
        full16 = model(ids).logits.float()
    scale = full.abs().max()
    assert (full16 - full).abs().max() / scale < 0.05
    assert (inc16 - full).abs().max() / scale < 2 * (full16 - full).abs().max() / scale + 1e-3


@pytest.mark.slow
def test_decoding_with_triton_kernels_forced():
    """Kernels on (TRITON_INTERPRET on CPU): the prompt runs the fused FFT-conv kernels, steps the torch
    dot products; both equal the full kernel forward."""
    model = _model("m2_gpt", torch.float32, kernels="triton", max_seq_len=32)
    ids = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        full = model(ids).logits
        inc = _decode_in_pieces(model, ids, [8] + [1] * 8)
    assert (inc - full).abs().max() / full.abs().max() < 1e-5


@pytest.mark.parametrize("variant", ["m2_gpt", "gpt"])
def test_generation_with_cache_equals_full_recompute(variant):
    model = _model(variant)
    prompt = torch.randint(0, 101, (3, 6))
    for sampling in (SamplingConfig(temperature=0), SamplingConfig(temperature=1.3, top_k=20, top_p=0.9)):
        runs = [generate(model, prompt, 16, sampling, generator=torch.Generator().manual_seed(7), use_cache=c)
                for c in (True, False)]
        assert torch.equal(runs[0].tokens, runs[1].tokens)
        assert runs[0].tokens.shape == (3, 22) and torch.equal(runs[0].tokens[:, :6], prompt)
        assert runs[0].stopped == ["length"] * 3
    # Greedy is argmax of the full forward at every step.
    greedy = generate(model, prompt, 10, SamplingConfig(temperature=0)).tokens
    with torch.no_grad():
        assert torch.equal(model(greedy[:, :-1]).logits[:, 5:].argmax(-1), greedy[:, 6:])


def test_generation_stops_rows_at_eos_and_restores_train_mode():
    model = _model("m2_gpt").train()
    prompt = torch.randint(0, 101, (2, 4))
    free = generate(model, prompt, 12, SamplingConfig(temperature=0))
    assert model.training                                       # mode restored
    eos = free.new_tokens[0][3]                                 # row 0's 4th greedy token becomes the EOS
    first = free.new_tokens[0].index(eos)
    out = generate(model, prompt, 12, SamplingConfig(temperature=0), eos_token_id=eos)
    assert out.new_tokens[0] == free.new_tokens[0][:first] and out.stopped[0] == "eos"
    # Row 0 is padded with EOS after it stopped; row 1 runs on exactly as without an EOS until its own.
    assert (out.tokens[0, 4 + first:] == eos).all()
    row1 = free.new_tokens[1]
    expected1 = row1[:row1.index(eos)] if eos in row1 else row1[:out.tokens.shape[1] - 4]
    assert out.new_tokens[1] == expected1
    if eos not in row1:
        assert out.stopped[1] == "length" and out.tokens.shape[1] == 16


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingConfig(**kw)))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.8) == [True, True, False, False]         # 0.5 + 0.3 reaches 0.8
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(top_p=0.1) == [True, False, False, False]        # the most likely token always stays
    assert torch.allclose(filter_logits(logits, SamplingConfig(temperature=2.0)), logits / 2)
    # Sampling with top_k=1 is greedy, whatever the temperature.
    model = _model("m2_gpt")
    prompt = torch.randint(0, 101, (2, 5))
    assert torch.equal(generate(model, prompt, 8, SamplingConfig(temperature=5.0, top_k=1)).tokens,
                       generate(model, prompt, 8, SamplingConfig(temperature=0)).tokens)
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_generation_and_decoding_errors():
    model = _model("m2_gpt")                                    # max_seq_len 40
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=40"):
        generate(model, torch.zeros(1, 30, dtype=torch.long), 11)
    with pytest.raises(ValueError, match="prompt ids must be in 0..100"):
        generate(model, torch.tensor([[5, 101]]), 3)
    with pytest.raises(ValueError, match="length >= 1"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 0)
    state = model.new_decode_state(1, 4)
    with torch.no_grad():
        model.decode(torch.zeros(1, 4, dtype=torch.long), state)
        with pytest.raises(ValueError, match="max_len=4"):
            model.decode(torch.zeros(1, 1, dtype=torch.long), state)
        with pytest.raises(DecodeLengthError):
            model.blocks[0].step(torch.zeros(1, 1, 32, dtype=torch.float64), state.caches[0])
    with pytest.raises(ValueError, match="model.max_seq_len=40"):
        model.new_decode_state(1, 41)
    with pytest.raises(TypeError, match="causal LM"):
        generate(build_model(tiny_model_cfg("m2_bert")), torch.zeros(1, 3, dtype=torch.long), 2)


def _export_folder(tmp_path, arch="m2_gpt", tokenizer=True):
    sp, proto = train_sentencepiece(TEXTS)
    model = build_model(tiny_model_cfg(arch, vocab_size=sp.get_piece_size(), max_seq_len=64))
    folder = tmp_path / f"export_{arch}"
    save_pretrained(model, folder)
    if tokenizer:
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "tokenizer.model").write_bytes(proto)
    return folder, sp


def test_generate_cli_on_an_export_folder(tmp_path, capsys):
    folder, sp = _export_folder(tmp_path)
    out_file = tmp_path / "samples.jsonl"
    args = ["generate", str(folder), "--prompt", "The river rose", "--prompt", "A small bakery",
            "--max-new-tokens", "12", "--temperature", "0", "--json", "--out", str(out_file)]
    assert cli_main(args) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["prompt"] for r in lines] == ["The river rose", "A small bakery"]
    assert [json.loads(line) for line in out_file.read_text().splitlines()] == lines
    assert "tokens/s" in captured.err and "incremental decoding" in captured.err
    # The same continuation as the library on the same ids: EOS first (the packed data's document start).
    from m2train.models import from_pretrained
    model = from_pretrained(folder)
    ids = [sp.eos_id()] + sp.encode("The river rose")
    assert lines[0]["prompt_tokens"] == len(ids)
    ref = generate(model, torch.tensor([ids]), 12, SamplingConfig(temperature=0), eos_token_id=sp.eos_id())
    assert lines[0]["new_tokens"] == ref.new_tokens[0] and lines[0]["stopped"] == ref.stopped[0]
    body = sp.encode("The river rose")
    assert lines[0]["completion"] == sp.decode(body + ref.new_tokens[0])[len(sp.decode(body)):]
    # Full recompute gives the same text; a seed fixes sampled text; several samples per prompt.
    assert cli_main(args[:-2] + ["--no-cache"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == lines
    sample = ["generate", str(folder), "--prompt", "The", "--num-samples", "3", "--seed", "3", "--json",
              "--max-new-tokens", "8"]
    assert cli_main(sample) == 0
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["sample"] for r in first] == [0, 1, 2]
    assert cli_main(sample) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == first
    # Plain output: a header and the prompt followed by its continuation.
    assert cli_main(args[:-3]) == 0
    text = capsys.readouterr().out
    # (One sample per prompt: streamed as generated, ending with the same text as the JSON's.)
    assert "=== prompt 2, sample 1 ===" in text and "The river rose" + lines[0]["completion"] + "\n" in text
    assert f"[{len(lines[0]['new_tokens'])} new tokens, stopped at {lines[0]['stopped']}]" in text


def test_generate_cli_errors(tmp_path, capsys):
    folder, _ = _export_folder(tmp_path)
    assert cli_main(["generate", str(folder)]) == 1
    assert "no prompt" in capsys.readouterr().err
    assert cli_main(["generate", str(folder), "--prompt", "x", "--max-new-tokens", "100"]) == 1
    assert "exceeds model.max_seq_len=64" in capsys.readouterr().err
    assert cli_main(["generate", str(folder), "--prompt", "x", "--top-p", "0"]) == 1
    assert "top_p" in capsys.readouterr().err
    bare, _ = _export_folder(tmp_path / "bare", tokenizer=False)
    assert cli_main(["generate", str(bare), "--prompt", "x"]) == 1
    assert "without a tokenizer" in capsys.readouterr().err
    bert, _ = _export_folder(tmp_path, arch="m2_bert")
    assert cli_main(["generate", str(bert), "--prompt", "x"]) == 1
    assert "generation needs a causal LM" in capsys.readouterr().err
    assert cli_main(["generate", str(tmp_path / "nowhere"), "--prompt", "x"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_streamed_text_never_shows_a_half_decoded_character(capsys):
    """Byte-fallback pieces of a character outside the tokenizer's vocabulary arrive one per step; the stream
    holds the replacement mark back until the character is whole, and ends with the full continuation."""
    import torch as _t

    from data_prep.tokenizers import SentencePieceTok
    from m2train.generate_cli import _completion_text, _TextStream

    _, proto = train_sentencepiece(TEXTS)
    path = Path(tempfile.mkdtemp()) / "tokenizer.model"
    path.write_bytes(proto)
    tok = SentencePieceTok(path)
    prompt = tok.encode_batch(["The river"])[0]
    new = tok.encode_batch([" rose ☃ and fell"])[0]
    assert sum(tok.sp.id_to_piece(t).startswith("<0x") for t in new) >= 3      # ☃ is three byte pieces
    stream = _TextStream(tok, prompt, tok.special_tokens["eos"])
    for t in new:
        stream(_t.tensor([t]))
    printed = capsys.readouterr().out
    assert "\ufffd" not in printed and printed == _completion_text(tok, prompt, new) == stream.shown
    assert printed.endswith("☃ and fell")
