"""Ray layer: Train workers (`worker`), the trainer builder and driver (`launch`), Ray Jobs (`jobs`),
a local two-node cluster (`local_cluster`) and the CLI subcommands (`commands`)."""
