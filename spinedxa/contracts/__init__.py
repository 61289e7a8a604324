"""The files passed between stages: one module per file format, holding its columns, its one reader and its writer.

Stages and package modules import these instead of re-declaring columns or re-implementing readers
(docs/CONTRACTS.md describes every file). The modules are leaves: they import only numpy, pandas, Pillow and
:mod:`spinedxa.files`, so depending on a contract never drags torch, scikit-learn, MLflow or great-expectations
into a stage's import closure.

- :mod:`~spinedxa.contracts.table`: CSV tables of strings with required columns (the generic reader/writer).
- :mod:`~spinedxa.contracts.jsonfile`: JSON records with required keys; finite-or-null numbers.
- :mod:`~spinedxa.contracts.png16`: 16-bit grayscale PNG images (ingested, ROI and augmented images).
- :mod:`~spinedxa.contracts.manifest`: ``data/ingested/manifest.csv``.
- :mod:`~spinedxa.contracts.splits`: ``data/split/splits.csv`` (folds and roles).
- :mod:`~spinedxa.contracts.augmented`: ``data/augmented/index.csv``.
- :mod:`~spinedxa.contracts.predictions`: ``reports/predictions/<model>.csv``.
- :mod:`~spinedxa.contracts.external`: ``data/external`` (the external cohort, or its disabled marker).
- :mod:`~spinedxa.contracts.metrics`: ``reports/metrics/<model>.json`` keys.
"""
