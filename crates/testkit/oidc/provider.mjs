// An OpenID Provider for breakglass's tests: the certified `oidc-provider`
// package with the device flow (RFC 8628), the authorization code flow with
// PKCE, refresh tokens, `auth_time` and `amr` in ID tokens and a `groups`
// claim. Users log in through real HTML forms (login, then consent), which
// the Rust side (`breakglass_testkit::oidc`) drives over HTTP.
//
// Usage: node provider.mjs CONFIG_JSON
//
// The config (written by the Rust side) names the port, the users, the
// client, token lifetimes and two files in the instance's directory: the
// signing keys and the provider's state (sessions, grants, refresh tokens),
// so a restart on the same port keeps both. With `rotate: true` a new
// signing key is generated and put first (it signs from now on); the
// previous one stays published so tokens it signed still verify.
//
// Listens on 127.0.0.1 only. Prints "ready" on stdout once it accepts
// connections.

import { readFileSync, writeFileSync, renameSync, existsSync } from 'node:fs';
import { randomUUID } from 'node:crypto';
import * as jose from 'jose';
import Provider, { interactionPolicy } from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const issuer = `http://127.0.0.1:${config.port}`;

// Published keys: the newest first, at most this many.
const KEYS_KEPT_MAX = 3;
// Form bodies larger than this are refused.
const FORM_BYTES_MAX = 16 * 1024;

function writeAtomic(path, text) {
  const tmp = `${path}.${process.pid}.tmp`;
  writeFileSync(tmp, text, { mode: 0o600 });
  renameSync(tmp, path);
}

async function newSigningKey() {
  const { privateKey } = await jose.generateKeyPair('RS256', { extractable: true });
  const jwk = await jose.exportJWK(privateKey);
  return { ...jwk, kid: randomUUID(), alg: 'RS256', use: 'sig' };
}

let keys = existsSync(config.keys_file) ? JSON.parse(readFileSync(config.keys_file, 'utf8')) : [];
if (keys.length === 0 || config.rotate) {
  keys = [await newSigningKey(), ...keys].slice(0, KEYS_KEPT_MAX);
  writeAtomic(config.keys_file, JSON.stringify(keys));
}

// The provider's state, kept in one JSON file so a restart keeps sessions,
// grants and refresh tokens (a real provider's database survives a restart).
const state = existsSync(config.state_file) ? JSON.parse(readFileSync(config.state_file, 'utf8')) : {};
const saveState = () => writeAtomic(config.state_file, JSON.stringify(state));
const now = () => Math.floor(Date.now() / 1000);

class FileAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    state[this.key(id)] = { payload, expires_at: expiresIn ? now() + expiresIn : null };
    saveState();
  }

  async find(id) {
    const entry = state[this.key(id)];
    if (!entry) return undefined;
    if (entry.expires_at !== null && entry.expires_at <= now()) {
      delete state[this.key(id)];
      saveState();
      return undefined;
    }
    return entry.payload;
  }

  async findBy(field, value) {
    const prefix = `${this.model}:`;
    for (const [k, entry] of Object.entries(state)) {
      if (k.startsWith(prefix) && entry.payload[field] === value) {
        return this.find(k.slice(prefix.length));
      }
    }
    return undefined;
  }

  async findByUserCode(userCode) {
    return this.findBy('userCode', userCode);
  }

  async findByUid(uid) {
    return this.findBy('uid', uid);
  }

  async consume(id) {
    const entry = state[this.key(id)];
    if (entry) {
      entry.payload.consumed = now();
      saveState();
    }
  }

  async destroy(id) {
    delete state[this.key(id)];
    saveState();
  }

  async revokeByGrantId(grantId) {
    for (const [k, entry] of Object.entries(state)) {
      if (entry.payload.grantId === grantId) delete state[k];
    }
    saveState();
  }
}

const users = new Map(config.users.map((u) => [u.name, u]));

// `max_age=0` becomes `prompt=login`, which the package keeps with a
// device code but does not check when the user enters the code; this
// check asks for the login there too, so a fresh login is one on both
// flows.
const policy = interactionPolicy.base();
policy.get('login').checks.add(new interactionPolicy.Check(
  'device_login_prompt',
  'a fresh login was requested',
  'login_required',
  (ctx) => {
    const prompt = ctx.oidc.deviceCode?.params?.prompt ?? '';
    return prompt.split(' ').includes('login') && !ctx.oidc.result?.login;
  },
));

const provider = new Provider(issuer, {
  adapter: FileAdapter,
  jwks: { keys },
  cookies: { keys: [config.cookie_key] },
  clients: [{
    client_id: config.client_id,
    client_name: 'breakglass',
    application_type: 'native',
    token_endpoint_auth_method: 'none',
    grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
    response_types: ['code'],
    // Native clients' loopback redirects match on any port (RFC 8252 §7.3).
    // The CLI's loopback redirect, and the web console's (any port: a
    // native client's loopback URIs match whatever the port).
    redirect_uris: ['http://127.0.0.1/callback', 'http://127.0.0.1/signin/oidc/callback'],
    require_auth_time: true,
  }],
  scopes: ['openid', 'offline_access', 'profile', 'groups', 'email'],
  claims: {
    // `amr` comes from the login, not the account; listing it under
    // `openid` puts it in every ID token.
    openid: ['sub', 'amr'],
    profile: ['preferred_username', 'name'],
    groups: ['groups'],
    email: ['email', 'email_verified'],
  },
  // Profile and groups claims go into the ID token, which is what the
  // breakglass CLI sends.
  conformIdTokenClaims: false,
  features: {
    devInteractions: { enabled: false },
    deviceFlow: { enabled: true },
    revocation: { enabled: true },
  },
  // Refresh tokens for every grant of a client allowed to use them, as
  // many providers do; `offline_access` is dropped by the authorization
  // endpoint unless `prompt=consent` is sent.
  issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
  ttl: {
    IdToken: config.id_token_ttl_s,
    AccessToken: config.id_token_ttl_s,
    DeviceCode: 600,
    RefreshToken: 86400,
  },
  interactions: {
    url: (_ctx, interaction) => `/interaction/${interaction.uid}`,
    policy,
  },
  async findAccount(_ctx, sub) {
    const user = users.get(sub);
    if (!user) return undefined;
    return {
      accountId: sub,
      async claims() {
        return {
          sub, preferred_username: sub, name: sub, groups: user.groups,
          email: `${sub}@example.com`, email_verified: true,
        };
      },
    };
  },
  pkce: { required: () => true },
});

const escape = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(title, body) {
  return `<!DOCTYPE html><html><head><meta charset="utf-8"><title>${escape(title)}</title></head><body><h1>${escape(title)}</h1>${body}</body></html>`;
}

async function readForm(req) {
  let size = 0;
  const chunks = [];
  for await (const chunk of req) {
    size += chunk.length;
    if (size > FORM_BYTES_MAX) throw new Error('form too large');
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function loginPage(uid, error) {
  return page('Sign in', `${error ? `<p class="error">${escape(error)}</p>` : ''}
<form method="post" action="/interaction/${escape(uid)}/login">
<input type="text" name="login" autofocus>
<input type="password" name="password">
<button type="submit">Sign in</button>
</form>`);
}

function consentPage(uid, clientId, scope) {
  return page('Authorize', `<p>${escape(clientId)} asks for: ${escape(scope)}</p>
<form method="post" action="/interaction/${escape(uid)}/confirm">
<button type="submit">Continue</button>
</form>`);
}

// The device authorization response names the polling interval (the
// package leaves it out, which means 5 s); tests use a shorter one.
provider.use(async (ctx, next) => {
  await next();
  if (ctx.path === '/device/auth' && ctx.status === 200 && ctx.body && typeof ctx.body === 'object') {
    ctx.body = { ...ctx.body, interval: config.device_interval_s };
  }
});

// Login and consent pages, in front of the provider's own routes.
provider.use(async (ctx, next) => {
  const match = /^\/interaction\/([\w-]+)(?:\/(login|confirm))?$/.exec(ctx.path);
  if (!match) return next();
  const [, uid, step] = match;
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  if (details.uid !== uid) ctx.throw(400, 'interaction mismatch');
  const { prompt, params } = details;
  ctx.set('cache-control', 'no-store');
  if (ctx.method === 'GET' && !step) {
    ctx.type = 'html';
    ctx.body = prompt.name === 'login'
      ? loginPage(uid)
      : consentPage(uid, params.client_id, params.scope);
    return undefined;
  }
  if (ctx.method !== 'POST') ctx.throw(405);
  const form = await readForm(ctx.req);
  let result;
  if (step === 'login') {
    if (prompt.name !== 'login') ctx.throw(400, 'not at the login step');
    const user = users.get(form.get('login') ?? '');
    if (!user || user.password !== form.get('password')) {
      ctx.status = 200;
      ctx.type = 'html';
      ctx.body = loginPage(uid, 'wrong user name or password');
      return undefined;
    }
    result = {
      login: {
        accountId: user.name,
        amr: user.mfa ? ['pwd', 'mfa'] : ['pwd'],
      },
    };
  } else {
    if (prompt.name !== 'consent') ctx.throw(400, 'not at the consent step');
    const { details: missing } = prompt;
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    result = { consent: details.grantId ? {} : { grantId } };
  }
  const returnTo = await provider.interactionResult(ctx.req, ctx.res, result, {
    mergeWithLastSubmission: true,
  });
  ctx.status = 303;
  ctx.redirect(returnTo);
  return undefined;
});

const server = provider.listen(config.port, '127.0.0.1', () => {
  process.stdout.write('ready\n');
});
server.on('error', (e) => {
  process.stderr.write(`cannot listen on 127.0.0.1:${config.port}: ${e.message}\n`);
  process.exit(1);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  // State is written synchronously on every change: nothing to flush.
  process.on(signal, () => process.exit(0));
}
