"""A real S3 API on a loopback port (moto's standalone server), to try ``s3://`` stores on one machine.

The server speaks S3 over HTTP like AWS or MinIO, and checks signatures: it holds one IAM user whose key
the stores use (through the environment, as on a real fleet), so a wrong key is refused as AWS would
refuse it. Its objects live in the process that started it: :meth:`LocalS3.stop` and :meth:`LocalS3.start`
are an outage of the service, not a loss of its data. The s3 store tests use it in-process; the store
benchmark runs ``python -m orchestrator.s3local`` as a process of its own. Needs ``edgeloop[dev]`` (moto).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from orchestrator.sshfleet import free_port

ALLOW_ALL = json.dumps({"Version": "2012-10-17",
                        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})


@dataclass
class LocalS3:
    port: int
    bucket: str
    region: str = "us-east-1"
    key_id: str = ""
    secret: str = ""

    def __post_init__(self):
        self._server = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/fleet"

    def options(self) -> dict[str, str]:
        """The store options an inventory would carry for this service (no credentials)."""
        return {"endpoint_url": self.endpoint_url, "region": self.region}

    def env(self) -> dict[str, str]:
        """What a host's environment holds for the store: the IAM user's key, and no other AWS source."""
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
        self._server = ThreadedMotoServer("127.0.0.1", self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        """Stop answering (connections are refused); the objects stay for the next :meth:`start`."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self, key_id: str | None = None, secret: str | None = None):
        """A boto3 S3 client of its own (for tests that look at the bucket as S3 sees it)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=key_id or self.key_id, aws_secret_access_key=secret or self.secret)

    def add_user(self, name: str, policy: dict) -> dict[str, str]:
        """Another IAM user (a site's own credentials) with ``policy``; returns its environment (as :meth:`env`)."""
        import boto3

        self._check_signatures(False)
        try:
            iam = boto3.client("iam", endpoint_url=self.endpoint_url, region_name=self.region,
                               aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
            user = f"{name}-{self.port}"
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="store", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=user)["AccessKey"]
        finally:
            self._check_signatures(True)
        return {**self.env(), "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def _bootstrap(self) -> None:
        """The bucket and a user allowed to use it, created before signatures are checked; then checked."""
        import boto3

        anyone = {"endpoint_url": self.endpoint_url, "region_name": self.region,
                  "aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
        iam = boto3.client("iam", **anyone)
        user = f"edgeloop-{self.port}"  # moto's IAM is the process's: another server in it has its own user
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="store", PolicyDocument=ALLOW_ALL)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        boto3.client("s3", **anyone).create_bucket(Bucket=self.bucket)
        self._check_signatures(True)

    def _check_signatures(self, on: bool) -> None:
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset-auth", method="POST",
                                         data=b"0" if on else b"inf", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()


@contextmanager
def local_s3(bucket: str = "edgeloop-fleet", port: int | None = None) -> Iterator[LocalS3]:
    """A started :class:`LocalS3` with its bucket and user; signatures unchecked again afterwards."""
    server = LocalS3(port or free_port(), bucket)
    server.start()
    try:
        server._bootstrap()
        yield server
    finally:
        if server._server is None:
            server.start()
        server._check_signatures(False)  # moto's settings are the process's: leave them as found
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="default: a free one")
    parser.add_argument("--bucket", default="edgeloop-fleet")
    args = parser.parse_args(argv)
    with local_s3(args.bucket, args.port or None) as server:
        print(json.dumps({"url": server.url, "options": server.options(), "env": server.env()}), flush=True)
        threading.Event().wait()  # until killed
    return 0


if __name__ == "__main__":
    sys.exit(main())
