"""Custom TFDS builders for the offline default datasets (array_record, read without TensorFlow)."""
