// The official `openai` Node package, unchanged, against imagegate: a generation, an edit with
// a mask, an edit with several images and a variation. Node builds multipart bodies its own way
// (undici's FormData), so this checks the gateway reads them as it reads the Python SDK's.
// Usage: node sdk.mjs BASE_URL PNG_256 MASK_256 ; exits non-zero on the first failure.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import OpenAI, { toFile } from "openai";

const [base, pngPath, maskPath] = process.argv.slice(2);
const client = new OpenAI({ apiKey: "sk-imagegate-demo", baseURL: `${base}/v1`, maxRetries: 0 });
const png = readFileSync(pngPath);
const mask = readFileSync(maskPath);

function pngSize(b64) {
  const bytes = Buffer.from(b64, "base64");
  assert.equal(bytes.subarray(1, 4).toString(), "PNG");
  return [bytes.readUInt32BE(16), bytes.readUInt32BE(20)];
}

const generated = await client.images.generate({
  model: "dall-e-2", prompt: "a lighthouse", size: "256x256", response_format: "b64_json",
});
assert.deepEqual(pngSize(generated.data[0].b64_json), [256, 256]);

const edited = await client.images.edit({
  model: "dall-e-2",
  image: await toFile(png, "in.png", { type: "image/png" }),
  mask: await toFile(mask, "mask.png", { type: "image/png" }),
  prompt: "a red sun", size: "256x256", response_format: "b64_json", n: 2,
});
assert.equal(edited.data.length, 2);
assert.deepEqual(pngSize(edited.data[0].b64_json), [256, 256]);

const several = await client.images.edit({
  model: "gpt-image-2",
  image: [await toFile(png, "a.png", { type: "image/png" }), await toFile(png, "b.png", { type: "image/png" })],
  prompt: "combine them",
});
assert.equal(several.data.length, 1);

const variation = await client.images.createVariation({
  image: await toFile(png, "in.png", { type: "image/png" }), n: 1, size: "512x512",
  response_format: "b64_json",
});
assert.deepEqual(pngSize(variation.data[0].b64_json), [512, 512]);

try {
  await client.images.edit({ model: "dall-e-2", image: await toFile(Buffer.from("not an image"), "x.png"), prompt: "x" });
  assert.fail("a text file was accepted as an image");
} catch (e) {
  assert.ok(e instanceof OpenAI.BadRequestError, `expected BadRequestError, got ${e}`);
  assert.equal(e.param, "image");
}
console.log("node sdk: generation, edit with mask, edit with two images, variation, 400: ok");
