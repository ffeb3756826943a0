"""The in-memory image-folder loader holds the decoded set once: one preallocated uint8 tensor filled in place (no
list of images stacked into a second copy) and a mean/std pass over bounded chunks (no float copy of the whole set).
Every tensor that torch functions create while the set loads is recorded (a TorchFunctionMode), so the test counts
allocations rather than timing or measuring the process."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from formats import write_jpeg_folder
from repopt.data import dataset as dataset_module
from repopt.data import load_dataset

SIZE = 24


class _Storages(TorchFunctionMode):
    """The storages (base pointer -> bytes) of every tensor a torch function returns in this thread."""

    def __init__(self):
        super().__init__()
        self.seen: dict[int, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                self.seen[storage.data_ptr()] = max(self.seen.get(storage.data_ptr(), 0), storage.nbytes())
        return out


@pytest.fixture
def folder(tmp_path):
    write_jpeg_folder(tmp_path / "data", classes=("a", "b", "c", "d"), per_class=12, val_per_class=3,
                      size=(SIZE + 6, SIZE + 10))
    return tmp_path / "data"


def test_the_decoded_set_is_one_allocation_and_no_float_copy_of_it(folder, monkeypatch):
    per_image = 3 * SIZE * SIZE
    chunk_images = 4  # the mean/std pass sees at most 4 images at a time here (of 48)
    monkeypatch.setattr(dataset_module, "STATISTICS_CHUNK_VALUES", chunk_images * per_image)
    with _Storages() as storages:
        ds = load_dataset("folder", str(folder), SIZE, loader="memory")
    train_bytes = ds.train_images.untyped_storage().nbytes()
    assert ds.train_images.dtype == torch.uint8 and train_bytes == 48 * per_image  # the pixels, nothing more
    big = {ptr: n for ptr, n in storages.seen.items() if n > chunk_images * per_image * 8}  # > one float64 chunk
    assert big == {ds.train_images.untyped_storage().data_ptr(): train_bytes}, big  # no stacked or float copy


def test_every_image_is_written_into_the_preallocated_set(folder):
    """Preallocated and filled in place: the pixels equal decoding each file alone (nothing left as allocated)."""
    from repopt.data.folder import _backend, _decode_pillow, _decode_torchvision, _fit, _read_all
    from repopt.data.imagefiles import scan_folder

    _, _, train, _, _ = scan_folder(folder)
    files = [train.path(i) for i in range(len(train))]
    backend = _backend()
    decode = _decode_torchvision if backend == "torchvision" else _decode_pillow
    read = _read_all(files, SIZE, backend)
    assert torch.equal(read, torch.stack([_fit(decode(f, SIZE), SIZE) for f in files]))


def test_statistics_do_not_depend_on_the_chunk_size(folder, monkeypatch):
    whole = load_dataset("folder", str(folder), SIZE, loader="memory")
    monkeypatch.setattr(dataset_module, "STATISTICS_CHUNK_VALUES", 1)  # one image at a time
    chunked = load_dataset("folder", str(folder), SIZE, loader="memory")
    assert chunked.mean == pytest.approx(whole.mean, rel=1e-12) and chunked.std == pytest.approx(whole.std, rel=1e-12)
