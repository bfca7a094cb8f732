"""The 24 GiB budget search: its bisection (on CPU, with a stand-in for 'this step fits') and its GPU guard."""

import pytest
import torch

from minisora.bench.budget import largest_fitting, main


@pytest.mark.parametrize("largest", [1, 2, 3, 7, 8, 100, 1024])
def test_largest_fitting_finds_the_boundary_in_few_trials(largest):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= largest

    assert largest_fitting(fits) == largest
    assert len(tried) <= 2 * max(1, largest).bit_length() + 2  # doubling, then bisecting


def test_largest_fitting_when_nothing_or_everything_fits():
    assert largest_fitting(lambda n: False) == 0
    assert largest_fitting(lambda n: True, limit=64) == 64
    assert largest_fitting(lambda n: n <= 40, start=1, limit=48) == 40


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_without_a_gpu_the_search_says_so(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
