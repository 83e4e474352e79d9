#!/usr/bin/env bash
# The README's test command: start the services the tests need (scripts/test_services.sh),
# run the whole suite, then the service suite again with every server's queue on PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/test_services.sh
# Tests that need a service fail rather than skip when it is missing.
export CI=${CI:-1}
cargo test "$@"
TEST_STORE=postgres cargo test --test service "$@"
