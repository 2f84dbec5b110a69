"""On a CUDA device (marked ``gpu``: skipped without one): the model's float32 scores equal the
CPU's, bf16 autocast (``--amp``) stays close to them, and the loader's uint8 pixels normalised
on the device equal the CPU's."""

from __future__ import annotations

import pytest
import torch

from agiqa.data.loader import read_images
from agiqa.data.pixels import normalize
from agiqa.models.agiqa_net import create_model
from agiqa.stages.predict import predict

pytestmark = pytest.mark.gpu


def test_scores_on_cuda_equal_the_cpus_and_amp_stays_close():
    torch.manual_seed(0)
    model = create_model("tiny", num_prompts=2, semantic_dim=8, pretrained=False)
    pixels = torch.randint(0, 256, (12, 3, 224, 224), dtype=torch.uint8)
    vectors = torch.randn(12, 2, 8)
    cpu = predict(model, pixels, vectors, torch.device("cpu"), batch_size=5)
    cuda = torch.device("cuda")
    model.to(cuda)
    gpu32 = predict(model, pixels, vectors, cuda, batch_size=5)
    gpu16 = predict(model, pixels, vectors, cuda, batch_size=5, amp=True)
    assert gpu32.device.type == "cpu" and gpu32.dtype == torch.float32
    torch.testing.assert_close(gpu32, cpu, atol=1e-4, rtol=1e-4)
    assert not torch.equal(gpu16, gpu32)  # autocast did run in bf16
    torch.testing.assert_close(gpu16, gpu32, atol=0.05, rtol=0.05)


def test_loader_pixels_normalised_on_cuda_equal_the_cpus(photo_folder):
    root, kinds = photo_folder
    files = [(root / k, k) for k, v in sorted(kinds.items()) if v == "ok"]
    pixels = torch.stack([d.value for d in read_images(files, 1, pixels=True)])
    on_device = normalize(pixels.pin_memory().to("cuda", non_blocking=True)).cpu()
    assert torch.equal(on_device, normalize(pixels))
