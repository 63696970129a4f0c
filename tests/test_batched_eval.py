"""run_eval renders several prompts per sampling call: each image keeps its own seed's noise, so the grid is the
one-at-a-time grid (to rounding), in the same order, with the progress callback once per image."""

import numpy as np

from sdlora.eval.evaluate import builtin_prompts, run_eval
from sdlora.models.base import load_base
from sdlora.sample.generate import generate_images


def test_batched_eval_makes_the_one_at_a_time_images():
    base, prompts = load_base("tiny"), builtin_prompts(5, "sks pastel")
    calls = []
    _, one = run_eval(base, [], prompts, [0.0], [], steps=6, use_checker=False, batch=1)
    _, many = run_eval(base, [], prompts, [0.0], [], steps=6, use_checker=False, batch=3,
                       progress=lambda: calls.append(1))  # chunks of 3 and 2
    assert len(many[0]) == 5 and len(calls) == 5
    a = np.stack([np.asarray(im, dtype=np.int16) for im in one[0]])
    b = np.stack([np.asarray(im, dtype=np.int16) for im in many[0]])
    assert np.abs(a - b).max() <= 2, np.abs(a - b).max()  # batched matmuls round differently, nothing more
    alone = np.asarray(generate_images(base, prompts[3].text, seed=3, steps=6)[0], dtype=np.int16)
    assert np.abs(alone - b[3]).max() <= 2  # image i is prompt i with seed + i
    assert np.abs(b[0] - b[1]).mean() > 5  # and the prompts/seeds really differ
