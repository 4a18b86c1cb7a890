#!/usr/bin/env bash
# Start-up script of the night-conductor VM (gcp backend). Uploaded to the instance's
# broker_files bucket by `pgbctl create`; the VM fetches the newest copy at every boot.
#
# The VM's metadata says what to do:
#   PGBCTL_SURVEY, PGBCTL_TESTID (empty = production), NIGHT = START | END, KAFKA_TOPIC
# It runs `pgbctl night start|end` for that instance and powers itself off afterwards.
set -euo pipefail

md() {  # read one metadata attribute (empty when unset)
  curl -sf -H "Metadata-Flavor: Google" \
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1" || true
}

SURVEY="$(md PGBCTL_SURVEY)"
TESTID="$(md PGBCTL_TESTID)"
NIGHT="$(md NIGHT)"
KAFKA_TOPIC="$(md KAFKA_TOPIC)"
PROJECT="$(curl -sf -H 'Metadata-Flavor: Google' \
  http://metadata.google.internal/computeMetadata/v1/project/project-id)"

args=(--backend gcp --project "$PROJECT" --survey "${SURVEY:?metadata PGBCTL_SURVEY is required}" --yes)
[ -n "$TESTID" ] && args+=(--testid "$TESTID")

case "$NIGHT" in
  START) pgbctl "${args[@]}" night start --kafka-topic "${KAFKA_TOPIC:-NONE}" ;;
  END)   pgbctl "${args[@]}" night end ;;
  *)     echo "night_conductor: metadata NIGHT must be START or END, got '${NIGHT}'" >&2; exit 2 ;;
esac

# clear the cue so a reboot does not repeat it, then stop the VM
ZONE="$(curl -sf -H 'Metadata-Flavor: Google' \
  http://metadata.google.internal/computeMetadata/v1/instance/zone | awk -F/ '{print $NF}')"
gcloud compute instances remove-metadata "$(hostname)" --zone "$ZONE" --keys NIGHT || true
shutdown -h now
