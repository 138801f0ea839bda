"""The two tasks, by clip_benchmark's names, and the metric retrieval is calibrated and reported on."""
CLASSIFICATION, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"
TASKS = (CLASSIFICATION, RETRIEVAL)
RETRIEVAL_METRIC = "image_retrieval_recall@10"  # text -> image, at search's default top_k
