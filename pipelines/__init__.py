"""Prefect flows around the segpipe stages: ``ingest`` (version new imagery with DVC),
``retrain`` (``dvc repro`` stage by stage, then promotion) and ``deploy`` (serve ``retrain`` on
a cron schedule). Nothing in ``segpipe/`` knows about Prefect: the flows call the same CLIs
and ``dvc``/``git`` a person would."""
