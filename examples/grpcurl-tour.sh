#!/usr/bin/env bash
# The grpcurl tour (docs/tour-grpcurl.md) as a script: every command is printed, then its output.
# It creates its own users, orders and accounts (names and request ids carry a per-run suffix, so
# it can run again on the same database) and reads ids from the replies instead of assuming 1, 2, 3.
#
#   examples/grpcurl-tour.sh [HOST:PORT]          (default 127.0.0.1:50051)
#
# GRPCURL: the binary (default: grpcurl on PATH, else .venv/bin/grpcurl).
# GRPCURL_TRANSPORT: connection flags (default -plaintext; e.g. "-cacert ca.crt" for TLS).
# SHOP_TOKEN: sent as `authorization: Bearer <token>` when set.
set -euo pipefail

address="${1:-127.0.0.1:50051}"
here="$(cd "$(dirname "$0")" && pwd)"
grpcurl_bin="${GRPCURL:-$(command -v grpcurl || echo "${here}/../.venv/bin/grpcurl")}"
read -r -a transport <<<"${GRPCURL_TRANSPORT:--plaintext}"
auth=()
if [ -n "${SHOP_TOKEN:-}" ]; then
    auth=(-H "authorization: Bearer ${SHOP_TOKEN}")
fi
run="$(date +%s)-$$"

# Run grpcurl, echoing the command (without the token) and its output.
g() {
    echo "\$ grpcurl ${transport[*]} ${*@Q}"
    "${grpcurl_bin}" "${transport[@]}" "${auth[@]}" "$@"
}

# A call that must fail with the given grpcurl code name (e.g. FailedPrecondition).
expect_error() {
    local code="$1" out
    shift
    echo "\$ grpcurl ${transport[*]} ${*@Q}"
    if out="$("${grpcurl_bin}" "${transport[@]}" "${auth[@]}" "$@" 2>&1)"; then
        echo "${out}"
        echo "tour: expected Code: ${code}, the call succeeded" >&2
        exit 1
    fi
    echo "${out}"
    if ! grep -q "Code: ${code}" <<<"${out}"; then
        echo "tour: expected Code: ${code}" >&2
        exit 1
    fi
}

# The first top-level "field": "value" of a grpcurl JSON reply on stdin (ids are JSON strings).
field() { sed -n "s/^  \"$1\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}\$/\1/p" | head -n1; }

# Like g, and keeps the reply in $reply, for reading ids from it.
gk() {
    reply="$(g "$@")"
    echo "${reply}"
}

# WatchChanges never ends on its own: grpcurl's -max-time ends it. Prints the responses that
# came before that, keeps them in $reply, and fails unless the call ended by that deadline.
watch() {
    local seconds="$1" out
    shift
    echo "\$ grpcurl ${transport[*]} -max-time ${seconds} ${*@Q}"
    if out="$("${grpcurl_bin}" "${transport[@]}" "${auth[@]}" -max-time "${seconds}" "$@" 2>&1)"; then
        echo "${out}"
        echo "tour: WatchChanges ended on its own" >&2
        exit 1
    fi
    echo "${out}"
    if ! grep -q "Code: DeadlineExceeded" <<<"${out}"; then
        echo "tour: expected WatchChanges to run until -max-time" >&2
        exit 1
    fi
    reply="${out}"
}

section() { printf '\n### %s\n\n' "$*"; }

section "Discover"
g "${address}" list
g "${address}" describe shop.v1.UserService
g "${address}" describe shop.v1.UpdateUserRequest

section "UserService"
gk -d "{\"email\":\"ada-${run}@example.com\",\"first_name\":\"Ada\",\"last_name\":\"Lovelace\"}" \
    "${address}" shop.v1.UserService/CreateUser
ada="$(field id <<<"${reply}")"
gk -d "{\"email\":\"alan-${run}@example.com\",\"first_name\":\"Alan\",\"last_name\":\"Turing\"}" \
    "${address}" shop.v1.UserService/CreateUser
alan="$(field id <<<"${reply}")"
g -d "{\"email\":\"grace-${run}@example.com\",\"first_name\":\"Grace\",\"last_name\":\"Hopper\"}" \
    "${address}" shop.v1.UserService/CreateUser
g -d "{\"id\":${ada}}" "${address}" shop.v1.UserService/GetUser
g -d "{\"user\":{\"id\":${ada},\"last_name\":\"King\",\"first_name\":\"ignored\"},\"update_mask\":{\"paths\":[\"last_name\"]}}" \
    "${address}" shop.v1.UserService/UpdateUser

gk -d '{"page_size":2}' "${address}" shop.v1.UserService/ListUsers
token="$(field next_page_token <<<"${reply}")"
g -d "{\"page_size\":2,\"page_token\":\"${token}\"}" "${address}" shop.v1.UserService/ListUsers
g -d '{"batch_size":2}' "${address}" shop.v1.UserService/StreamUsers
g -d "{\"users\":[{\"email\":\"ada-${run}@example.com\",\"first_name\":\"Ada\",\"last_name\":\"Lovelace\"},{\"email\":\"edsger-${run}@example.com\",\"first_name\":\"Edsger\",\"last_name\":\"Dijkstra\",\"is_active\":false}]}" \
    "${address}" shop.v1.UserService/UpsertUsers

section "OrderService"
order_request="{\"user_id\":${ada},\"request_id\":\"order-${run}\",\"items\":[{\"sku\":\"BOOK-1\",\"quantity\":2,\"unit_price\":\"12.50\"},{\"sku\":\"PEN-9\",\"quantity\":1,\"unit_price\":\"0.99\"}]}"
gk -d "${order_request}" "${address}" shop.v1.OrderService/CreateOrder
order="$(field id <<<"${reply}")"
# The same request_id and request again: the same order comes back.
gk -d "${order_request}" "${address}" shop.v1.OrderService/CreateOrder
again="$(field id <<<"${reply}")"
if [ "${again}" != "${order}" ]; then
    echo "tour: a retried CreateOrder made order ${again}, not ${order}" >&2
    exit 1
fi
expect_error AlreadyExists -d "{\"user_id\":${alan},\"request_id\":\"order-${run}\",\"items\":[{\"sku\":\"X\",\"quantity\":1,\"unit_price\":\"1.00\"}]}" \
    "${address}" shop.v1.OrderService/CreateOrder
g -d "{\"id\":${order}}" "${address}" shop.v1.OrderService/GetOrder
g -d "{\"id\":${order},\"status\":\"ORDER_STATUS_PAID\"}" "${address}" shop.v1.OrderService/UpdateOrderStatus
expect_error FailedPrecondition -d "{\"id\":${order},\"status\":\"ORDER_STATUS_PENDING\"}" \
    "${address}" shop.v1.OrderService/UpdateOrderStatus

section "AccountService"
gk -d "{\"user_id\":${ada},\"currency\":\"EUR\",\"request_id\":\"open-ada-${run}\"}" \
    "${address}" shop.v1.AccountService/OpenAccount
from="$(field id <<<"${reply}")"
gk -d "{\"user_id\":${alan},\"currency\":\"EUR\",\"request_id\":\"open-alan-${run}\"}" \
    "${address}" shop.v1.AccountService/OpenAccount
to="$(field id <<<"${reply}")"
g -d "{\"account_id\":${from},\"amount\":\"100.00\",\"request_id\":\"dep-${run}\"}" \
    "${address}" shop.v1.AccountService/Deposit
g -d "{\"from_account_id\":${from},\"to_account_id\":${to},\"amount\":\"25.50\",\"request_id\":\"tr-${run}\"}" \
    "${address}" shop.v1.AccountService/Transfer
g -d "{\"account_id\":${to},\"page_size\":10}" "${address}" shop.v1.AccountService/ListTransfers
# Payouts in one call: each item applied or refused on its own (the second overdraws).
g -d "{\"requests\":[{\"from_account_id\":${from},\"to_account_id\":${to},\"amount\":\"10.00\",\"request_id\":\"pay-1-${run}\"},{\"from_account_id\":${from},\"to_account_id\":${to},\"amount\":\"900.00\",\"request_id\":\"pay-2-${run}\"}]}" \
    "${address}" shop.v1.AccountService/BatchTransfer
g -d "{\"id\":${from}}" "${address}" shop.v1.AccountService/GetAccount

section "ChangeFeedService"
# A snapshot of the current users, then the stream waits for changes (-max-time ends it).
watch 3 -d '{"resource_types":["RESOURCE_TYPE_USER"],"start_position":"START_POSITION_SNAPSHOT","max_batch_size":2}' \
    "${address}" shop.v1.ChangeFeedService/WatchChanges
# From now on: the first response is an empty CAUGHT_UP whose token marks where it stands...
types='"resource_types":["RESOURCE_TYPE_ACCOUNT","RESOURCE_TYPE_TRANSFER"]'
watch 2 -d "{${types},\"start_position\":\"START_POSITION_NOW\"}" \
    "${address}" shop.v1.ChangeFeedService/WatchChanges
since="$(sed -n 's/^  "resume_token": "\([^"]*\)",\{0,1\}$/\1/p' <<<"${reply}" | head -n1)"
g -d "{\"account_id\":${to},\"amount\":\"5.00\",\"request_id\":\"dep-feed-${run}\"}" \
    "${address}" shop.v1.AccountService/Deposit
# ... and resuming from it brings the deposit: its transfer and the account's new balance.
watch 2 -d "{${types},\"resume_token\":\"${since}\"}" \
    "${address}" shop.v1.ChangeFeedService/WatchChanges

section "Errors carry details"
expect_error InvalidArgument -d '{"email":"not-an-email","first_name":"","last_name":"X"}' \
    "${address}" shop.v1.UserService/CreateUser
expect_error FailedPrecondition -d "{\"from_account_id\":${from},\"to_account_id\":${to},\"amount\":\"500.00\",\"request_id\":\"tr-2-${run}\"}" \
    "${address}" shop.v1.AccountService/Transfer
expect_error InvalidArgument -d "{\"account_id\":${from},\"amount\":\"1.234\",\"request_id\":\"dep-2-${run}\"}" \
    "${address}" shop.v1.AccountService/Deposit
expect_error NotFound -d '{"id":999999999}' "${address}" shop.v1.UserService/GetUser

printf '\ntour complete\n'
