"""A fake AWS for SkyPilot: a moto server, hand-written service catalogs and a SkyPilot config
in a temporary HOME. Used inside a loopback-only network namespace (see sky_moto_driver.py).

What SkyPilot 0.14.1 needs to launch offline against moto:
- catalogs (schema v8) under $HOME/.sky/catalogs/v8; a file without a `.meta/<file>.md5`
  counts as the user's own and is never downloaded again;
- `aws: remote_identity: <instance profile>` in $HOME/.sky/config.yaml, and that profile in IAM;
- a default VPC with an internet gateway and a 0.0.0.0/0 route in the region that should work;
  a region without one fails with ResourcesUnavailableError ("all candidate subnets are private");
- the AZ mapping cache pre-seeded, else SkyPilot asks every region moto knows (slow);
- a fresh release-version cache, else the API server asks the package index.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

GOOD_REGION = "us-east-1"  # has an internet gateway
BAD_REGION = "us-west-2"  # default VPC without one: capacity failure
REGIONS = (GOOD_REGION, BAD_REGION)
ZONE_ID = {GOOD_REGION: "use1-az6", BAD_REGION: "usw2-az2"}  # one zone each, as moto names them
INSTANCE_PROFILE = "llmgw-test-instance-profile"
AMI_ID = "ami-785db401"  # an Ubuntu image moto registers in every region

_A10G = (
    "{'Gpus': [{'Name': 'A10G', 'Manufacturer': 'NVIDIA', 'Count': 1, 'MemoryInfo': {'SizeInMiB': 24576}}], "
    "'TotalGpuMemoryInMiB': 24576}"
)


def catalogs() -> dict[str, list[str]]:
    vms = [
        "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,"
        "AvailabilityZone,Arch,LocalDiskType,NVMeSupported,LocalDiskSize,LocalDiskCount,MaximumEfaInterfaces"
    ]
    for region in REGIONS:
        vms.append(f"m6i.large,,,2.0,8.0,,0.096,0.04,{region},{ZONE_ID[region]},x86_64,,False,,,")
        vms.append(
            f'g5.xlarge,A10G,1.0,4.0,16.0,"{_A10G}",1.006,0.4,{region},{ZONE_ID[region]},x86_64,ssd,True,250.0,1.0,'
        )
    tags = ("skypilot:custom-cpu-ubuntu", "skypilot:custom-gpu-ubuntu-cuda13", "skypilot:custom-gpu-ubuntu")
    return {
        "aws/vms.csv": vms,
        "aws/images.csv": ["Tag,Region,OS,OSVersion,ImageId,CreationDate"]
        + [f"{tag},{r},ubuntu,22.04,{AMI_ID},20240101" for tag in tags for r in REGIONS],
        # Header only: no quota code for these types, so no service-quotas call.
        "aws/instance_quota_mapping.csv": ["InstanceType,OnDemandInstanceCode,SpotInstanceCode"],
        "common/accelerators.csv": ["AcceleratorName,Clouds", "A10G,\"['AWS']\""],
        "common/metadata.csv": ["GPU,MemoryGB,Manufacturer", "A10G,24,NVIDIA"],
    }


def write_sky_home(home: Path) -> None:
    root = home / ".sky"
    for rel, lines in catalogs().items():
        path = root / "catalogs" / "v8" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    (root / "config.yaml").write_text(
        f"allowed_clouds:\n  - aws\naws:\n  remote_identity: {INSTANCE_PROFILE}\n"
    )
    (root / "version_cache.json").write_text(
        json.dumps({"release_version": "0.14.1", "cached_at": time.time()})
    )


def setup_cloud(home: Path) -> None:
    """VPC, internet gateway and route in the good region only; the instance profile; AZ cache."""
    import boto3

    ec2 = boto3.client("ec2", region_name=GOOD_REGION)
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]
    igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc["VpcId"])
    table = ec2.describe_route_tables(
        Filters=[
            {"Name": "vpc-id", "Values": [vpc["VpcId"]]},
            {"Name": "association.main", "Values": ["true"]},
        ]
    )["RouteTables"][0]
    ec2.create_route(RouteTableId=table["RouteTableId"], DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)

    iam = boto3.client("iam", region_name=GOOD_REGION)
    trust = {
        "Statement": [
            {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
        ]
    }
    iam.create_role(RoleName=INSTANCE_PROFILE, AssumeRolePolicyDocument=json.dumps(trust))
    iam.create_instance_profile(InstanceProfileName=INSTANCE_PROFILE)
    iam.add_role_to_instance_profile(InstanceProfileName=INSTANCE_PROFILE, RoleName=INSTANCE_PROFILE)

    user_id = boto3.client("sts").get_caller_identity()["UserId"]
    rows = ["AvailabilityZoneName,AvailabilityZone"]
    for region in REGIONS:
        for zone in boto3.client("ec2", region_name=region).describe_availability_zones()[
            "AvailabilityZones"
        ]:
            rows.append(f"{zone['ZoneName']},{zone['ZoneId']}")
    digest = hashlib.md5(user_id.encode()).hexdigest()[:8]
    (home / ".sky" / "catalogs" / "v8" / "aws" / f"az_mappings-{digest}.csv").write_text(
        "\n".join(rows) + "\n"
    )


def instances(region: str, *, include_terminated: bool = True) -> list[dict[str, Any]]:
    import boto3

    found = []
    for reservation in boto3.client("ec2", region_name=region).describe_instances()["Reservations"]:
        for instance in reservation["Instances"]:
            if include_terminated or instance["State"]["Name"] != "terminated":
                found.append(instance)
    return found


def make_buckets(region: str, names: list[str]) -> None:
    """Buckets in moto's S3: the weight store and the compile cache a render mounts."""
    import boto3

    s3 = boto3.client("s3", region_name=region)
    for name in names:
        s3.create_bucket(Bucket=name)
