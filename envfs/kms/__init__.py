"""envfs's key management service: a regional master-key store modelled on AWS KMS."""
