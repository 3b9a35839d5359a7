"""Model-level oracles: cached decoding, padding, generation, saving, errors."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

from keras_primer import (
    PrimerBackbone,
    PrimerCausalLM,
    PrimerCausalLMPreprocessor,
    PrimerTokenizer,
)

BACKEND = keras.backend.backend()
VOCAB, MAX_LEN = 64, 32
CONFIGS = {
    "primer": {},
    "baseline": {"activation": "gelu", "use_dconv": False},
    "labml_compat": {"share_conv_kernels_across_heads": True, "conv_bias": True, "kernel_size": 4},
}


def to_np(x):
    return np.asarray(ops.convert_to_numpy(x))


def tiny_backbone(vocabulary_size=VOCAB, **overrides):
    config = dict(
        vocabulary_size=vocabulary_size,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=MAX_LEN,
    )
    config.update(overrides)
    backbone = PrimerBackbone(**config)
    # Non-trivial conv taps so that a wrong state would show.
    for weight in backbone.weights:
        if "conv" in weight.path:
            weight.assign(np.random.randn(*weight.shape).astype("float32"))
    return backbone


def tiny_lm(sequence_length=16, **overrides):
    backbone = tiny_backbone(vocabulary_size=256, **overrides)
    preprocessor = PrimerCausalLMPreprocessor(PrimerTokenizer(), sequence_length=sequence_length)
    return PrimerCausalLM(backbone, preprocessor)


def random_ids(batch, length, low=4):
    return np.random.randint(low, VOCAB, size=(batch, length)).astype("int32")


def full_logits(lm, ids, mask=None):
    mask = np.ones_like(ids) if mask is None else mask
    return to_np(lm({"token_ids": ids, "padding_mask": mask.astype("int32")}))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("prefill", [0, 1, 2, 5])
def test_cached_decoding_equals_full_forward(name, prefill):
    lm = PrimerCausalLM(tiny_backbone(**CONFIGS[name]))
    ids = random_ids(2, 9)
    expected = full_logits(lm, ids)
    cache = lm.empty_cache(2, 9)
    pieces = []
    if prefill:
        logits, _, cache = lm.call_with_cache(ids[:, :prefill], cache, 0)
        pieces.append(to_np(logits))
    for t in range(prefill, 9):
        logits, _, cache = lm.call_with_cache(ids[:, t : t + 1], cache, t)
        pieces.append(to_np(logits))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), expected, atol=1e-5)
    assert ("conv" in cache) == CONFIGS[name].get("use_dconv", True)


def test_left_padded_batch_cached_equals_full_and_unpadded():
    lm = PrimerCausalLM(tiny_backbone())
    lengths = [9, 6, 4]
    rows = [random_ids(1, n)[0] for n in lengths]
    ids = np.zeros((3, 9), "int32")
    mask = np.zeros((3, 9), bool)
    for i, row in enumerate(rows):
        ids[i, 9 - len(row) :] = row
        mask[i, 9 - len(row) :] = True
    expected = full_logits(lm, ids, mask)
    cache = lm.empty_cache(3, 9)
    pieces = []
    for t in range(9):
        logits, _, cache = lm.call_with_cache(ids[:, t : t + 1], cache, t, padding_mask=mask)
        pieces.append(to_np(logits))
    stepped = np.concatenate(pieces, axis=1)
    for i, row in enumerate(rows):
        real = slice(9 - len(row), 9)
        np.testing.assert_allclose(stepped[i, real], expected[i, real], atol=1e-5)
        alone = full_logits(lm, row[None, :])
        np.testing.assert_allclose(expected[i, real], alone[0], atol=1e-5)


def test_backbone_is_causal():
    lm = PrimerCausalLM(tiny_backbone())
    ids = random_ids(2, 12)
    changed = ids.copy()
    changed[:, 7:] = random_ids(2, 5)
    before, after = full_logits(lm, ids), full_logits(lm, changed)
    np.testing.assert_array_equal(before[:, :7], after[:, :7])
    assert not np.allclose(before[:, 7:], after[:, 7:])


def naive_greedy(lm, prompt_ids, steps):
    """Greedy decoding by one full forward pass per new token. Each pass sees
    the sequence right-padded to its final length (exact for a causal model,
    see `test_backbone_is_causal`), so every pass has one shape (one trace)."""
    ids = list(prompt_ids)
    total = len(ids) + steps
    for _ in range(steps):
        padded = np.array([ids + [0] * (total - len(ids))], "int32")
        logits = full_logits(lm, padded)
        ids.append(int(np.argmax(logits[0, len(ids) - 1])))
    return ids


@pytest.mark.parametrize("name", ["primer", "baseline"])
def test_generate_matches_naive_greedy_for_ragged_batch(name):
    lm = tiny_lm(**CONFIGS[name])
    lm.compile(sampler="greedy")
    prompts = ["ROMEO: hello", "To"]
    max_length = 16
    outputs = lm.generate(prompts, max_length=max_length, stop_token_ids=None)
    tokenizer = lm.preprocessor.tokenizer
    for prompt, output in zip(prompts, outputs):
        prompt_ids = [tokenizer.start_token_id] + [int(i) for i in tokenizer(prompt)]
        expected = naive_greedy(lm, prompt_ids, max_length - len(prompt_ids))
        expected_text = tokenizer.detokenize(
            [i for i in expected[1:] if i not in tokenizer.special_token_ids]
        )
        assert output == expected_text


@pytest.mark.parametrize("sampler", ["greedy", "top_k", "top_p"])
def test_generate_starts_with_prompt(sampler):
    lm = tiny_lm()
    lm.compile(sampler=sampler)
    outputs = lm.generate(["ROMEO:", "JULIET: good"], max_length=14)
    assert outputs[0].startswith("ROMEO:") and outputs[1].startswith("JULIET: good")
    assert isinstance(lm.generate("ROMEO:", max_length=10), str)


def test_fit_lowers_loss_on_tiny_corpus():
    lm = tiny_lm(sequence_length=24)
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    corpus = ["to be or not to be, that is the question"] * 8
    before = lm.evaluate(corpus, batch_size=8, verbose=0, return_dict=True)
    history = lm.fit(corpus, batch_size=8, epochs=30, verbose=0)
    after = lm.evaluate(corpus, batch_size=8, verbose=0, return_dict=True)
    assert after["loss"] < 0.7 * before["loss"]
    assert after["perplexity"] < before["perplexity"]
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_keras_file_and_preset_round_trip(tmp_path):
    lm = tiny_lm()
    lm.compile(sampler="greedy")
    ids = np.random.randint(4, 256, (2, 10)).astype("int32")
    expected = full_logits(lm, ids)
    path = os.path.join(tmp_path, "lm.keras")
    lm.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(full_logits(restored, ids), expected, atol=1e-6)
    assert isinstance(restored.preprocessor.tokenizer, PrimerTokenizer)

    preset = os.path.join(tmp_path, "preset")
    lm.save_to_preset(preset)
    from_preset = PrimerCausalLM.from_preset(preset)
    np.testing.assert_allclose(full_logits(from_preset, ids), expected, atol=1e-6)
    from_preset.compile(sampler="greedy")
    assert from_preset.generate("ROMEO:", max_length=12) == lm.generate("ROMEO:", max_length=12)
    tokenizer = PrimerTokenizer.from_preset(preset)
    assert (
        tokenizer.start_token_id == 2
        and tokenizer.end_token_id == 3
        and tokenizer.pad_token_id == 0
    )
    assert PrimerBackbone.from_preset(preset).get_config() == lm.backbone.get_config()


@pytest.mark.slow
def test_weights_saved_on_another_backend_give_same_logits(tmp_path):
    other = {"tensorflow": "jax", "jax": "torch", "torch": "tensorflow"}[BACKEND]
    script = textwrap.dedent(
        f"""
        import numpy as np, keras
        from keras_primer import PrimerBackbone, PrimerCausalLM
        keras.utils.set_random_seed(1)
        lm = PrimerCausalLM(PrimerBackbone(vocabulary_size=64, num_layers=2, num_heads=2,
            hidden_dim=16, intermediate_dim=32, max_sequence_length=32))
        ids = np.random.randint(0, 64, (2, 11)).astype("int32")
        logits = lm({{"token_ids": ids, "padding_mask": np.ones_like(ids)}})
        lm.save(r"{tmp_path}/lm.keras")
        np.save(r"{tmp_path}/ids.npy", ids)
        np.save(r"{tmp_path}/logits.npy", keras.ops.convert_to_numpy(logits))
        """
    )
    env = dict(os.environ, KERAS_BACKEND=other)
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=1800)
    restored = keras.saving.load_model(os.path.join(tmp_path, "lm.keras"))
    ids = np.load(os.path.join(tmp_path, "ids.npy"))
    np.testing.assert_allclose(
        full_logits(restored, ids), np.load(os.path.join(tmp_path, "logits.npy")), atol=1e-5
    )


# --- bad input ---------------------------------------------------------------


def test_bad_token_id_inputs_raise_clear_errors():
    lm = PrimerCausalLM(tiny_backbone())
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match=r"outside the vocabulary.*\[0, 63\]"):
        lm.predict(
            {
                "token_ids": np.full((2, 5), VOCAB, "int32"),
                "padding_mask": np.ones((2, 5), "int32"),
            },
            verbose=0,
        )
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lm.backbone(
            {"token_ids": np.full((1, 3), -1, "int32"), "padding_mask": np.ones((1, 3), "int32")}
        )
    with pytest.raises(ValueError, match="max_sequence_length=32"):
        lm.backbone(
            {
                "token_ids": random_ids(1, MAX_LEN + 1),
                "padding_mask": np.ones((1, MAX_LEN + 1), "int32"),
            }
        )
    with pytest.raises(ValueError, match="rank 2"):
        lm.backbone({"token_ids": ids[0], "padding_mask": np.ones((5,), "int32")})
    with pytest.raises(ValueError, match="integer token ids"):
        lm.backbone({"token_ids": ids.astype("float32"), "padding_mask": np.ones_like(ids)})
    with pytest.raises(ValueError, match="padding_mask"):
        lm.backbone({"token_ids": ids, "padding_mask": np.ones((2, 4), "int32")})


def test_bad_generate_inputs_raise_clear_errors():
    lm = tiny_lm()
    lm.compile(sampler="greedy")
    with pytest.raises(ValueError, match="a prompt is empty"):
        lm.generate(["ROMEO:", ""], max_length=10)
    with pytest.raises(ValueError, match="more than max_length=8"):
        lm.generate("a prompt that is far too long", max_length=8)
    with pytest.raises(ValueError, match="max_sequence_length=32"):
        lm.generate("ROMEO:", max_length=MAX_LEN + 1)
