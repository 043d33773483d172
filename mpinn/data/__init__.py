"""Per-rank data, by concern: files (opening, naming, fingerprints), read (a rank's rows and the
checks every reader runs), shuffle (epoch orders and the global shuffle's row exchange) and
sources (the BatchSource the training loop takes its batches from)."""
from .files import canonical_spec, data_files, file_identity, open_h5, spec_identity
from .read import (
                   Columns,
                   RowSource,
                   block_selections,
                   class_names,
                   has_dataset,
                   inspect,
                   plan_selections,
                   pread_fully,
                   read_file_rows,
                   read_inputs,
                   read_rows,
                   read_weights,
                   stored_classes,
)
from .shuffle import (
                   GlobalShuffle,
                   epoch_permutation,
                   global_shuffle,
                   global_shuffle_rows,
                   rank_permutation,
)
from .split import split_rows
from .sources import (
                   BatchSource,
                   EpochBatches,
                   GlobalShuffleSource,
                   InMemorySource,
                   StreamedBatches,
                   StreamedSource,
                   epoch_file_rows,
)

__all__ = ["BatchSource", "Columns", "EpochBatches", "GlobalShuffle", "GlobalShuffleSource",
           "InMemorySource", "RowSource", "StreamedBatches", "StreamedSource", "block_selections",
           "canonical_spec", "class_names", "data_files", "epoch_file_rows", "epoch_permutation",
           "file_identity", "global_shuffle", "global_shuffle_rows", "has_dataset", "inspect",
           "open_h5", "plan_selections", "pread_fully", "rank_permutation", "read_file_rows",
           "read_inputs", "read_rows", "read_weights", "spec_identity", "split_rows",
           "stored_classes"]
