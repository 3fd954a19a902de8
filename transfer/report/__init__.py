"""Run directories -> one comparison report: a table (markdown + CSV) and plots.

Reads the ``results.json`` of pretraining, linear-eval and detection OUTPUT_DIRs
(docs/formats.md), groups them by pre-training ``name`` and writes one row per pre-training (one
per detection run when a pre-training was transferred several times). Values come from the files
only; a value no file gives is shown as "-". Curves come from the runs' ``metrics.json``
(detectron2 ``JSONWriter``: one JSON object per line).

Plots: ``ap_vs_top1.png`` (box AP against linear top-1, one labelled point per pre-training with
its seed sds as error bars, the paper's published points with ``--paper``; first in report.md),
``ap_bars.png`` (box AP per row), ``pretrain_loss.png`` (pretraining loss),
``detection_curves.png`` (detection loss and AP) and ``pretrain_health.png``: per pretraining run
vs iteration, the training loss, the health metrics (``[metric]health/contrastive_top1``,
``alignment``, ``uniformity``, ``emb_std``; pretrain/health.py) and the kNN monitor's
``knn_top1`` / ``instance_retrieval_top1``, with the kNN top-1 of each random-init linear eval as
a dashed line. Panels whose keys no run logged are left out; runs logged before these metrics
existed give no ``pretrain_health.png`` at all. The dashed line is lincls's own kNN (its k, T and
val split): the same measurement as the monitor only when both are configured alike, and the
report notes where the k / T recorded in the files differ.

Next to the linear-probe top-1 each row shows the kNN top-1 of the same linear-eval run (frozen
backbone, same val split; ``knn_top1``), that run's val-set size (``val_images``) and the
pretraining seed: a ``seed`` in the pre-training's meta if one is there, else ``SEED`` of the
pretraining run's ``config.yaml`` (its OUTPUT_DIR among the runs, or the folder of the checkpoint
the linear eval or the conversion read). A random-init backbone has no pretraining seed: "-".

Linear evals of one pre-training with several seeds (``PRETRAIN_SEEDS="0 1 2" make demo``) also
get a seeds table: a row per seed, a mean +- sd row and one sentence per pair of pre-trainings on
whether the gap is above the seed noise (:mod:`.seeds`, plot ``lincls_seeds.png``).

Modules, one job each: :mod:`.runs` finds and reads the run dirs, :mod:`.rows` joins them into
rows, :mod:`.seeds` sums up the linear evals over seeds, :mod:`.tables` formats the markdown table
and CSV, :mod:`.plots` draws the PNGs and :mod:`.document` writes it all (:func:`make_report`,
what tools/report.py calls).
"""

from transfer.report.document import Report, make_report

__all__ = ["Report", "make_report"]
