import dagster as dg

# One partition per patient, keyed by a pseudonym (never a name or record number). The sensor
# adds keys as studies arrive.
patients_partitions = dg.DynamicPartitionsDefinition(name="patients")
