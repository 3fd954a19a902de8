"""Shared by every test module."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # On a 2-core machine shared with data-loader workers or subprocesses, oversubscribed OpenMP
    # threads crawl; one intra-op thread per test process is the fastest setting.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory):
    """``shapes_folder(num_train, num_val, size, style="grey")`` -> the ImageFolder root of a
    shapes dataset (seed 0) made once per test session for those arguments. Tests must not write
    into it."""
    from transfer.shapes import make_shapes

    made = {}

    def make(num_train: int, num_val: int, size: int, style: str = "grey") -> str:
        key = (num_train, num_val, size, style)
        if key not in made:
            out = tmp_path_factory.mktemp("shapes") / "shapes"
            make_shapes(
                str(out), num_train=num_train, num_val=num_val, size=size, seed=0, style=style
            )
            made[key] = str(out / "imagefolder")
        return made[key]

    return make
