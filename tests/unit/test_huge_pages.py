"""The matmul weights moved onto 2 MB pages after loading (engine/runtime.py:
collapse_into_huge_pages): which stretches are collapsed, that a collapse keeps the bytes and
addresses, and that the loader hands it every weight a decode step reads."""

from __future__ import annotations

import logging
import mmap
from pathlib import Path

import pytest
import torch

from engine.layers.linear import Linear, can_prepack
from engine.loader import load_model
from engine.runtime import (
    HUGE_PAGE,
    HUGE_PAGES_ENV,
    _anonymous_huge_bytes,
    collapse_into_huge_pages,
    huge_page_spans,
)
from tests.devices import cpu_only
from tests.tiny_models import save_tiny_model

MB = 1 << 20


def test_spans_widen_each_region_to_whole_huge_pages_inside_its_mapping() -> None:
    base = 64 * HUGE_PAGE
    mapping = [(base, base + 8 * HUGE_PAGE)]
    # a region starting and ending mid-page takes both pages it touches
    assert huge_page_spans([(base + HUGE_PAGE + 4096, HUGE_PAGE)], mapping) == [
        (base + HUGE_PAGE, base + 3 * HUGE_PAGE)]
    # widening stops at the mapping's ends, and a page the mapping only partly covers is left
    unaligned = [(base + 4096, base + 3 * HUGE_PAGE - 4096)]
    assert huge_page_spans([(base + 8192, 2 * HUGE_PAGE)], unaligned) == [
        (base + HUGE_PAGE, base + 2 * HUGE_PAGE)]
    # regions sharing a page, or in touching pages, become one stretch; empty ones none
    regions = [(base, MB), (base + MB, MB), (base + HUGE_PAGE, HUGE_PAGE),
               (base + 4 * HUGE_PAGE + 8192, 4096), (base + 6 * HUGE_PAGE, 0)]
    assert huge_page_spans(regions, mapping) == [
        (base, base + 2 * HUGE_PAGE), (base + 4 * HUGE_PAGE, base + 5 * HUGE_PAGE)]
    # a region outside every mapping (freed, or file-backed memory) gives nothing
    assert huge_page_spans([(base + 16 * HUGE_PAGE, 4 * MB)], mapping) == []


def test_a_region_over_two_mappings_is_cut_at_the_gap() -> None:
    base = 64 * HUGE_PAGE
    mappings = [(base, base + 2 * HUGE_PAGE), (base + 3 * HUGE_PAGE, base + 5 * HUGE_PAGE)]
    assert huge_page_spans([(base, 5 * HUGE_PAGE)], mappings) == [
        (base, base + 2 * HUGE_PAGE), (base + 3 * HUGE_PAGE, base + 5 * HUGE_PAGE)]


def _private_anonymous(nbytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    """Fresh memory of our own (on 4 KB pages unless the machine puts every fault on huge
    ones), as a uint8 tensor over it."""
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return region, torch.frombuffer(region, dtype=torch.uint8)


def _huge_bytes_at(address: int) -> int:
    """AnonHugePages, in bytes, of the mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:  # a mapping's first line
                if inside:
                    break
                low, high = (int(part, 16) for part in fields[0].split("-"))
                inside = low <= address < high
            elif inside and fields[0] == "AnonHugePages:":
                return int(fields[1]) * 1024
    return 0


@cpu_only
def test_collapse_keeps_the_values_where_they_were() -> None:
    region, weight = _private_anonymous(18 * MB)
    weight.copy_(torch.randint(0, 256, (18 * MB,), dtype=torch.uint8))
    expected = weight.clone()
    address = weight.data_ptr()
    before = _huge_bytes_at(address)
    gained = collapse_into_huge_pages([(address, weight.nbytes)])
    if gained is None:
        pytest.skip("this kernel cannot collapse memory into huge pages (MADV_COLLAPSE, 6.1+)")
    after = _huge_bytes_at(address)
    assert weight.data_ptr() == address
    assert torch.equal(weight, expected)
    # at least the 2 MB pages wholly inside it (8 of its at most 10) are huge now
    if _thp_mode() == "always":  # every fault was a huge page already
        assert after >= 8 * HUGE_PAGE
    else:
        assert after - before >= 8 * HUGE_PAGE
        assert gained >= 8 * HUGE_PAGE
    weight.mul_(3)  # still ordinary writable memory
    assert torch.equal(weight, expected * 3)
    del weight
    region.close()


def test_the_variable_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HUGE_PAGES_ENV, "0")
    region, weight = _private_anonymous(8 * MB)
    weight.fill_(1)
    before = _anonymous_huge_bytes()
    assert collapse_into_huge_pages([(weight.data_ptr(), weight.nbytes)]) is None
    if _thp_mode() != "always":
        assert _anonymous_huge_bytes() == before
    del weight
    region.close()


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
            return setting.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


@cpu_only
@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_loading_collapses_every_matmul_weight(quantization: str | None,
                                               tiny_llama_dir: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Every Linear's weight (prepacked, int8 or int4 copy) is among the regions the loader
    collapses, and the load says what became of them."""
    with caplog.at_level(logging.INFO, logger="engine.loader"):
        model = load_model(str(tiny_llama_dir), dtype="bfloat16", device="cpu",
                           quantization=quantization).model
    regions = model.matmul_weight_regions()
    starts = {address for address, _ in regions}
    linears = [module for module in model.modules() if isinstance(module, Linear)]
    assert linears
    for linear in linears:
        if linear.packed_weight is not None:
            held = torch.ops.mkldnn.data_ptr(linear.packed_weight)
        elif linear.int8_weight is not None:
            held = linear.int8_weight.columns.untyped_storage().data_ptr()
        elif linear.int4_weight is not None:
            assert linear.int4_weight.columns is not None
            held = linear.int4_weight.columns.nibbles.untyped_storage().data_ptr()
        else:
            held = linear.weight.untyped_storage().data_ptr()
        assert held in starts
    line = next(record.getMessage() for record in caplog.records
                if "matmul weights" in record.getMessage() and "pages" in record.getMessage())
    assert "onto 2 MB pages" in line or "left on 4 KB pages" in line


def test_a_tied_head_without_a_copy_collapses_the_embedding(tmp_path: Path) -> None:
    """fp32 gets no packed or quantized copy of a tied LM head, which then multiplies by the
    embedding table: the table is a matmul weight there, and only there."""
    tied = save_tiny_model("llama", tmp_path / "tied", tie_word_embeddings=True)
    fp32 = load_model(str(tied), dtype="float32", device="cpu").model
    assert fp32.output_head() is None and fp32.tied_output_head is None
    embedding = fp32.output_embedding().untyped_storage().data_ptr()
    assert embedding in {address for address, _ in fp32.matmul_weight_regions()}
    if can_prepack(torch.bfloat16, torch.device("cpu")):  # the packed copy is read instead
        bf16 = load_model(str(tied), dtype="bfloat16", device="cpu").model
        assert bf16.tied_output_head is not None
        embedding = bf16.output_embedding().untyped_storage().data_ptr()
        assert embedding not in {address for address, _ in bf16.matmul_weight_regions()}
