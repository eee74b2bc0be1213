"""StreamingDataset over a prepared split that also reports each sample's id and epoch.

MLM masking is seeded per (seed, epoch, sample id). streaming decides the epoch inside each worker when
an iteration starts (`_resume_incr_epoch`: a fresh epoch, or the one a loaded state resumes), so we record
it there and attach it, with the global sample id, to every sample.

This relies on two internals of mosaicml-streaming 0.13 (`_resume_incr_epoch` returning (epoch,
sample_in_epoch), and `get_item(sample_id)`); the guard below fails loudly if a release renames them.
"""

from __future__ import annotations

from streaming import StreamingDataset

if not (hasattr(StreamingDataset, "_resume_incr_epoch") and hasattr(StreamingDataset, "get_item")):
    raise ImportError("m2train.data needs mosaicml-streaming 0.13-compatible internals "
                      "(StreamingDataset._resume_incr_epoch / get_item); install mosaicml-streaming==0.13.*")


class TokenStream(StreamingDataset):
    """Yields {"tokens": ndarray, "sample_id": int, "epoch": int} for each sample of the split."""

    _m2_epoch: int = -1

    def _resume_incr_epoch(self):
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._m2_epoch = int(epoch)
        return epoch, sample_in_epoch

    def get_item(self, sample_id: int, retry: int = 7):
        sample = super().get_item(sample_id, retry)
        if "tokens" not in sample:
            raise KeyError(f"sample {sample_id} has no 'tokens' column (columns: {sorted(sample)}); "
                           f"see data_prep/FORMAT.md")
        return {"tokens": sample["tokens"], "sample_id": int(sample_id), "epoch": self._m2_epoch}
