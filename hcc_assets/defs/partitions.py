import dagster as dg

# One partition per patient, keyed by a pseudonym (never a name or record number). The sensor
# adds keys as studies arrive.
PATIENTS_PARTITIONS_NAME = "patients"
patients_partitions = dg.DynamicPartitionsDefinition(name=PATIENTS_PARTITIONS_NAME)
