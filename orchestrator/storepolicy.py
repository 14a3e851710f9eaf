"""Each site speaks only for itself in the store: what a site's credentials may touch.

A site writes its samples (``samples/<site>/``), its heartbeat (``status/<site>.json``) and its exam list
(``exams/<site>.json``), and reads the labels that come home to it (``labels/<site>.json``); nothing else. The
cloud refuses an exam list or heartbeat that names another site than the one whose path it is under; with these
credentials a site cannot even write under another site's path. ``edgeloop inventory policy`` prints the policy
per site; README ("Store credentials per site") shows how to attach it (an IAM user or role per site on S3, an
SFTP user per site chrooted to its folders).
"""

from __future__ import annotations

from urllib.parse import urlsplit


def site_paths(site: str) -> dict[str, list[str]]:
    """The store paths a site writes and the ones it reads, relative to the store's root."""
    own = [f"samples/{site}/*", f"status/{site}.json", f"exams/{site}.json"]
    return {"write": own, "read": [*own, f"labels/{site}.json"]}


def site_s3_policy(store_url: str, site: str) -> dict:
    """The IAM policy for one site's credentials on an ``s3://bucket/prefix`` store (also the uploads' temporary
    ``.*.part`` names a killed upload may leave in its own folder, which it sweeps)."""
    parts = urlsplit(store_url)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    key = (lambda path: f"{prefix}/{path}" if prefix else path)
    paths = site_paths(site)
    arn = (lambda path: f"arn:aws:s3:::{bucket}/{key(path)}")
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "OwnWrites", "Effect": "Allow", "Action": ["s3:PutObject", "s3:DeleteObject"],
         "Resource": [arn(p) for p in paths["write"]]},
        {"Sid": "OwnReads", "Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": [arn(p) for p in paths["read"]]},
        {"Sid": "OwnListings", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": f"arn:aws:s3:::{bucket}",
         "Condition": {"StringLike": {"s3:prefix": [key(f"samples/{site}/*"), key(f"samples/{site}"),
                                                    key("status/*"), key("status"), key("exams/*"),
                                                    key("labels/*")]}}},
    ]}
