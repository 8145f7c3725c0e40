"""The pipeline service: one DAG from corpus to registered model, and the ways to run it.

``dag`` runs prepare -> train -> evaluate -> register with step caching and
lineage; ``registry`` publishes Hugging Face format files to the MLflow Model
Registry and gates the ``champion`` alias; ``submit`` sends a run to a Ray
cluster as a job; ``scheduler`` fires those jobs on a cron schedule.
"""
