"""repbend in other trainers.

    repbend.integrations.hf   `RepBendTrainer` (a `transformers.Trainer` whose loss is `repbend.loss.RepBendLoss`),
                              `RepBendCollator` and `micro_batch_dataset` (dataset rows = micro-batches)

Nothing is imported here, so `import repbend.integrations` costs nothing; `repbend.integrations.hf` imports
transformers.
"""
