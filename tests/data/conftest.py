"""Fixtures the data tests share."""

import pytest


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """A TFDS dataset `tiny_text/en` prepared on disk: 4 files of 15 training examples, 10 validation."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    class TinyText(tfds.dataset_builders.TfDataBuilder):
        url_infos = None  # nothing to download (and no checksums file to look up)

    tfds.disable_progress_bar()
    directory = tmp_path_factory.mktemp("tfds")
    splits = {"train": [f"example {i}" for i in range(60)], "validation": [f"held {i}" for i in range(10)]}
    TinyText(name="tiny_text", config="en", version="1.0.0", data_dir=str(directory),
             split_datasets={k: tf.data.Dataset.from_tensor_slices({"text": v}) for k, v in splits.items()},
             features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
             ).download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=4))
    return directory
