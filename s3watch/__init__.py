"""s3watch: an agent that copies every photo added to a Piwigo gallery to an S3 bucket, exactly once."""

__version__ = "0.1.0"
