// The page's script: shop.v1.UserService over gRPC-Web with Connect-Web. No generated code:
// the contract comes from the FileDescriptorSet that `make generate` writes
// (generated/descriptors/shop_v1.binpb), which build.mjs embeds in the bundle.
import { createFileRegistry, fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema, timestampDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import descriptorSet from "shop-descriptors";

const DEADLINE_MS = 30_000;
const STREAM_BATCH_SIZE = 500;

const registry = createFileRegistry(fromBinary(FileDescriptorSetSchema, descriptorSet));
const UserService = registry.getService("shop.v1.UserService");

function show(id, text) {
  document.getElementById(id).textContent = text;
}

// The gRPC name of a status code, as other clients print it: NotFound -> NOT_FOUND.
function statusName(code) {
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

function showError(id, error) {
  const status = ConnectError.from(error);
  const element = document.getElementById(id);
  element.dataset.code = String(status.code);
  element.textContent = `${statusName(status.code)} (${status.code}): ${status.rawMessage}`;
}

async function getUser(client, id) {
  show("request-id", id);
  try {
    const user = await client.getUser({ id: BigInt(id) }, { timeoutMs: DEADLINE_MS });
    show("user-id", String(user.id));
    show("user-email", user.email);
    show("user-first-name", user.firstName);
    show("user-last-name", user.lastName);
    show("user-full-name", user.fullName);
    show("user-active", String(user.isActive));
    show("user-created-at", user.createdAt ? timestampDate(user.createdAt).toISOString() : "");
  } catch (error) {
    showError("get-user-error", error);
  }
}

async function streamUsers(client) {
  let rows = 0;
  let batches = 0;
  let lastId = "";
  try {
    const stream = client.streamUsers(
      { batchSize: STREAM_BATCH_SIZE },
      { timeoutMs: DEADLINE_MS },
    );
    for await (const batch of stream) {
      batches += 1;
      rows += batch.users.length;
      if (batch.users.length > 0) lastId = String(batch.users[batch.users.length - 1].id);
    }
  } catch (error) {
    showError("stream-users-error", error);
  } finally {
    show("stream-rows", String(rows));
    show("stream-batches", String(batches));
    show("stream-last-id", lastId);
  }
}

async function main() {
  const params = new URLSearchParams(window.location.search);
  const envoy = params.get("envoy") || "http://127.0.0.1:8080";
  show("envoy", envoy);
  const client = createClient(UserService, createGrpcWebTransport({ baseUrl: envoy }));
  try {
    await getUser(client, params.get("user") || "1");
    await streamUsers(client);
  } finally {
    document.body.dataset.done = "true";
    document.title = "done";
  }
}

main();
