"""Packaging for vac. Runtime dependencies are those of the product card plus aiohttp
(the metadata/MJF HTTP services need a real asyncio HTTP server with bounded bodies,
timeouts and keep-alive; hand-writing one would be less safe)."""

import os
import sys

from setuptools import find_packages, setup

# PEP 517 builds (pip install -e .) do not put the project directory on sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vac import __version__  # noqa: E402

setup(
    name="vac",
    version=__version__,
    description="Vac: a VM factory daemon for grid computing sites (vacuum model)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="BSD-2-Clause",
    python_requires=">=3.9",
    packages=find_packages(include=["vac", "vac.*"]),
    include_package_data=True,
    install_requires=[
        "libvirt-python",
        "requests",
        "pyOpenSSL",
        "python-daemon",
        "aiohttp>=3.9",  # handler_cancellation and BaseRunner shutdown_timeout (vac.services.metadata)
        "prometheus_client",  # the metrics endpoint (vac.ops.metrics): packaged on EL9 and Debian
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "responses", "dirq", "cryptography", "ruff", "matplotlib",
                 "vermin",  # scripts/run-tests: vac/ must run on EL9's Python 3.9
                 # vcycle's cloud tier: moto's EC2 server; openstacksdk proves the OpenStack
                 # emulator, built on keystoneauth1's token fixtures (which need fixtures)
                 "moto[server]", "openstacksdk", "fixtures"],
        "plots": ["matplotlib"],
        # vcycle: OpenStack through keystoneauth1, EC2 through boto3
        "cloud": ["keystoneauth1", "boto3"],
    },
    entry_points={
        "console_scripts": [
            "vac = vac.cli.main:main",
            "vacd = vac.daemon.vacd:main",
            "check-vacd = vac.cli.check:main",
            "vcycle = vac.cli.vcycle:main",
            "vcycled = vac.daemon.vcycled:main",
        ]
    },
)
