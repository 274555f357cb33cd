// Publish domain events to the vercel-event-consumer relay, with publisher confirms.
//
//   AMQP_URL=amqp://guest:guest@localhost:5672/ npx tsx publish.ts
//
// Settings (environment): AMQP_URL, EXCHANGE (domain-events), INSTALLATION_ID (icfg_demo),
// RESOURCE_ID (res_demo), COUNT (1), FORMAT: `plain` (our JSON body, the default),
// `cloudevents` (CloudEvents structured mode) or `cloudevents-binary` (attributes as ce-
// headers, data as the body). Prints `published <type> <id>` per confirmed event; exits 1 if
// any event was not confirmed (nacked, or returned because no queue is bound to its type).
import { randomUUID } from "node:crypto";
import amqp from "amqplib";
import type { ConfirmChannel, Options } from "amqplib";
import { CloudEvent } from "cloudevents";

type Format = "plain" | "cloudevents" | "cloudevents-binary";

interface DomainEvent {
  id: string;
  type: string; // resource.<verb> or billing.<verb>: also the routing key
  occurred_at: string; // RFC 3339 with an offset
  installation_id: string;
  resource_id?: string;
  product_id?: string;
  billing_plan_id?: string;
}

interface Wire {
  body: Buffer;
  options: Options.Publish;
}

const env = process.env;
const url = env.AMQP_URL ?? "amqp://guest:guest@localhost:5672/";
const exchange = env.EXCHANGE ?? "domain-events";
const format = (env.FORMAT ?? "plain") as Format;
const count = Number(env.COUNT ?? "1");

/** Our contract's body: id, type, occurred_at, installation_id and the type's fields. */
function makeEvent(): DomainEvent {
  return {
    id: `evt_${randomUUID()}`,
    type: "resource.renamed",
    occurred_at: new Date().toISOString(),
    installation_id: env.INSTALLATION_ID ?? "icfg_demo",
    resource_id: env.RESOURCE_ID ?? "res_demo",
  };
}

/** The message for one event in the chosen format; persistent, message_id = the event id. */
function toWire(event: DomainEvent): Wire {
  const common: Options.Publish = { persistent: true, mandatory: true, messageId: event.id };
  const { id, type, occurred_at, ...data } = event;
  const cloudEvent = new CloudEvent({
    id,
    type, // or reverse-DNS: "com.partner.resource.renamed"
    source: "/partner/typescript-publisher",
    time: occurred_at,
    datacontenttype: "application/json",
    data,
  });
  switch (format) {
    case "plain":
      return {
        body: Buffer.from(JSON.stringify(event)),
        options: { ...common, contentType: "application/json" },
      };
    case "cloudevents":
      return {
        body: Buffer.from(JSON.stringify(cloudEvent.toJSON())),
        options: { ...common, contentType: "application/cloudevents+json" },
      };
    case "cloudevents-binary": {
      const headers: Record<string, string> = {};
      for (const [name, value] of Object.entries(cloudEvent.toJSON())) {
        if (name !== "data" && name !== "datacontenttype" && value !== undefined) {
          headers[`ce-${name}`] = String(value);
        }
      }
      return {
        body: Buffer.from(JSON.stringify(data)),
        options: { ...common, contentType: "application/json", headers },
      };
    }
    default:
      throw new Error(`FORMAT must be plain, cloudevents or cloudevents-binary, not ${format}`);
  }
}

/** Publish one event and resolve once the broker confirmed it into a queue. */
function publish(channel: ConfirmChannel, returned: Set<string>, event: DomainEvent): Promise<void> {
  const { body, options } = toWire(event);
  return new Promise((resolve, reject) => {
    // Routing key = type: the relay's queue is bound with resource.# and billing.#.
    channel.publish(exchange, event.type, body, options, (error) => {
      if (error) reject(new Error(`event ${event.id} was nacked by the broker`));
      // The broker sends basic.return before the ack of an unroutable mandatory message.
      else if (returned.delete(event.id)) reject(new Error(`event ${event.id}: no queue bound`));
      else resolve();
    });
  });
}

async function main(): Promise<number> {
  const connection = await amqp.connect(url);
  try {
    const channel = await connection.createConfirmChannel();
    const returned = new Set<string>();
    channel.on("return", (message) => returned.add(String(message.properties.messageId)));
    await channel.assertExchange(exchange, "topic", { durable: true });
    const events = Array.from({ length: count }, makeEvent);
    // All in flight at once; each confirm is awaited on its own.
    const outcomes = await Promise.allSettled(events.map((e) => publish(channel, returned, e)));
    let failed = 0;
    outcomes.forEach((outcome, index) => {
      if (outcome.status === "fulfilled") console.log(`published ${events[index].type} ${events[index].id}`);
      else {
        failed += 1;
        console.error(`not published: ${outcome.reason.message}`);
      }
    });
    await channel.close();
    return failed === 0 ? 0 : 1;
  } finally {
    await connection.close().catch(() => undefined);
  }
}

main().then(
  (status) => process.exit(status),
  (error: Error) => {
    // One sentence, never the URL (it may hold a password).
    console.error(`publish failed: ${error.message.replace(url, "<AMQP_URL>")}`);
    process.exit(1);
  },
);
