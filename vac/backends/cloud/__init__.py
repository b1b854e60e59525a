"""Cloud backends for vcycle: OpenStack (keystoneauth1) and EC2 (boto3), one space each."""
