"""The GAN layers draw from the generator set for their thread (relaylearn.models.gan.random)."""

import threading

import torch

from relaylearn.models.gan import AdaptiveAugment
from relaylearn.models.gan.layers import NoiseInput
from relaylearn.models.gan.random import current_generator, drawing_from, rand, randint, randn, randn_like
from relaylearn.models.gan.regularizers import path_length_penalty


def _draws():
    x = torch.zeros(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    return [rand(3), randn(2, 2), randint(0, 7, (4,)), randn_like(x)]


def test_without_a_generator_the_wrappers_draw_what_torch_draws():
    torch.manual_seed(3)
    got = _draws()
    torch.manual_seed(3)
    x = torch.zeros(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    want = [torch.rand(3), torch.randn(2, 2), torch.randint(0, 7, (4,)), torch.randn_like(x)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[3].is_contiguous(memory_format=torch.channels_last)


def test_a_generator_set_for_the_thread_gives_its_draws_and_leaves_the_default_alone():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with drawing_from(torch.Generator().manual_seed(5)):
        first = _draws()
        assert current_generator() is not None
    assert current_generator() is None and torch.equal(torch.get_rng_state(), state)
    with drawing_from(torch.Generator().manual_seed(5)):
        again = _draws()
    with drawing_from(torch.Generator().manual_seed(6)):
        other = _draws()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other[1])
    assert first[3].is_contiguous(memory_format=torch.channels_last)


def test_the_generator_is_per_thread():
    seen = {}
    with drawing_from(torch.Generator().manual_seed(1)):
        worker = threading.Thread(target=lambda: seen.setdefault("other thread", current_generator()))
        worker.start()
        worker.join()
    assert seen == {"other thread": None}


def test_noise_inputs_augmentation_and_the_path_length_probe_draw_from_it():
    noise = NoiseInput(8)
    noise.strength.data.fill_(1.0)
    ada = AdaptiveAugment("bgc", num_channels=3, p=1.0)
    x = torch.zeros(2, 3, 8, 8)
    ws = torch.randn(2, 3, 4, requires_grad=True)

    def outputs():
        pl = path_length_penalty(lambda w: w.sum(dim=1, keepdim=True)[..., None].expand(-1, 1, 4, 4) * 1.0, ws, None, torch.zeros(()), decay=0.01)
        return [noise(x), ada(x + 1), pl[0]]

    torch.manual_seed(0)
    with drawing_from(torch.Generator().manual_seed(9)):
        first = outputs()
    torch.manual_seed(1)  # another default state: no effect inside the block
    with drawing_from(torch.Generator().manual_seed(9)):
        again = outputs()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    torch.manual_seed(0)
    assert not torch.equal(outputs()[0], first[0])  # the default generator draws other numbers
