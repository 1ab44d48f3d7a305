#!/usr/bin/env node
// A Node.js client of shop.v1: loads the .proto contract at run time (no generated code),
// creates two users, opens an account for each, deposits, transfers, then shows how a failed
// call reports its gRPC status code.
//
//   npm ci --prefix examples/node
//   node examples/node/client.js 127.0.0.1:50051
//
// Set SHOP_TOKEN to send `authorization: Bearer <token>` (when the server has SHOP_AUTH_TOKENS).
"use strict";

const path = require("node:path");
const crypto = require("node:crypto");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");
const DEADLINE_MS = 10_000;

function loadShop() {
  const files = ["user_service.proto", "account_service.proto"].map((f) =>
    path.join(PROTOS, "shop", "v1", f),
  );
  const definition = protoLoader.loadSync(files, {
    includeDirs: [PROTOS],
    keepCase: true, // field names as in the .proto: first_name, account_id
    longs: String, // int64 ids arrive as strings: no precision lost past 2^53
    enums: String,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).shop.v1;
}

// Promise wrapper: one call, a deadline, optional bearer token.
function call(client, method, request) {
  const metadata = new grpc.Metadata();
  if (process.env.SHOP_TOKEN) {
    metadata.set("authorization", `Bearer ${process.env.SHOP_TOKEN}`);
  }
  const deadline = new Date(Date.now() + DEADLINE_MS);
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code);
}

async function main() {
  const address = process.argv[2] || "127.0.0.1:50051";
  const shop = loadShop();
  const credentials = grpc.credentials.createInsecure();
  const users = new shop.UserService(address, credentials);
  const accounts = new shop.AccountService(address, credentials);
  // A suffix per run, so the example can run again against the same database.
  const run = crypto.randomBytes(4).toString("hex");

  const ada = await call(users, "CreateUser", {
    email: `ada-${run}@example.com`,
    first_name: "Ada",
    last_name: "Lovelace",
  });
  console.log(`created user ${ada.id} ${ada.email} (${ada.full_name})`);
  const alan = await call(users, "CreateUser", {
    email: `alan-${run}@example.com`,
    first_name: "Alan",
    last_name: "Turing",
  });
  console.log(`created user ${alan.id} ${alan.email} (${alan.full_name})`);

  const from = await call(accounts, "OpenAccount", {
    user_id: ada.id,
    currency: "EUR",
    request_id: `open-${run}-ada`,
  });
  console.log(`opened account ${from.id} (${from.currency}) for user ${from.user_id}`);
  const to = await call(accounts, "OpenAccount", {
    user_id: alan.id,
    currency: "EUR",
    request_id: `open-${run}-alan`,
  });
  console.log(`opened account ${to.id} (${to.currency}) for user ${to.user_id}`);

  const deposited = await call(accounts, "Deposit", {
    account_id: from.id,
    amount: "100.00", // money is a decimal string, never a float
    request_id: `dep-${run}`,
  });
  console.log(`deposited 100.00 into account ${deposited.id}: balance ${deposited.balance}`);

  const transfer = await call(accounts, "Transfer", {
    from_account_id: from.id,
    to_account_id: to.id,
    amount: "25.50",
    request_id: `tr-${run}`,
  });
  console.log(
    `transfer ${transfer.id}: ${transfer.amount} from account ${transfer.from_account_id}` +
      ` to account ${transfer.to_account_id}`,
  );
  for (const id of [from.id, to.id]) {
    const account = await call(accounts, "GetAccount", { id });
    console.log(`account ${account.id} balance ${account.balance}`);
  }

  try {
    await call(accounts, "Transfer", {
      from_account_id: from.id,
      to_account_id: to.id,
      amount: "500.00",
      request_id: `tr-${run}-too-much`,
    });
    throw new Error("a transfer beyond the balance succeeded");
  } catch (error) {
    if (error.code === undefined) throw error;
    console.log(`error status: ${statusName(error.code)} (${error.code}): ${error.details}`);
  }

  users.close();
  accounts.close();
}

main().catch((error) => {
  console.error(`client failed: ${error.code !== undefined ? statusName(error.code) : ""} ${error.message}`);
  process.exit(1);
});
