// A real OpenID Provider (node-oidc-provider, an OpenID-certified implementation) for the
// Keyless OAuth2 tests. Usage: node server.js CONFIG.json
//
// CONFIG.json: {"port": N, "ttl": seconds, "clients": [...], "subjectJwks": {...},
//               "subjectAudiences": [...]}
//   clients           oidc-provider client metadata (client_secret_basic/post, private_key_jwt)
//   subjectJwks       public keys trusted for token-exchange subject tokens (Keyless's JWKS,
//                     and a workload issuer's for tokens the caller presented)
//   subjectAudiences  audiences accepted on subject tokens besides the issuer itself
//
// Everything about tokens is oidc-provider's own code: client authentication, the
// client_credentials grant, RFC 8707 resource indicators, JWT access tokens signed with the
// provider's keys and published at /jwks. Two additions, both marked below:
//   * an RFC 8693 token-exchange grant registered with provider.registerGrantType, whose handler
//     verifies the subject token (and an actor token, which becomes `act`) against subjectJwks
//     and issues an oidc-provider access token;
//   * /_test/* endpoints that count token requests and inject faults (5xx, slow, non-JSON,
//     missing access_token) so the tests can prove Keyless fails closed.
import fs from 'node:fs';

import Provider, { errors } from 'oidc-provider';
import { createLocalJWKSet, jwtVerify } from 'jose';

const conf = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const issuer = `http://127.0.0.1:${conf.port}`;
const EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const stats = { token: 0, byGrant: {} };
let fault = null;

const provider = new Provider(issuer, {
  clients: conf.clients,
  ttl: { ClientCredentials: conf.ttl },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // Every API is a resource server with JWT access tokens, so the test upstream can verify
      // them against /jwks; the resource indicator becomes the token's audience.
      defaultResource: () => 'https://api.test',
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource) => ({
        scope: 'read write admin',
        audience: resource,
        accessTokenTTL: conf.ttl,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  // Exchanged tokens carry the subject they were issued for (RFC 8693 section 4.1 `act`).
  extraTokenClaims: (ctx) => ctx?.state?.exchange,
  formats: {
    customizers: {
      jwt(ctx, token, jwt) {
        if (jwt.payload.exchanged_sub) {
          // The actor is the one the actor token named (an agent acting for the user), else
          // the client that asked for the exchange.
          jwt.payload.act = { sub: jwt.payload.exchanged_act || jwt.payload.client_id };
          jwt.payload.sub = jwt.payload.exchanged_sub;
          delete jwt.payload.exchanged_sub;
          delete jwt.payload.exchanged_act;
        }
      },
    },
  },
});

// Addition 1: RFC 8693 token exchange as a registered grant type.
const subjectKeys = createLocalJWKSet(conf.subjectJwks || { keys: [] });
provider.registerGrantType(EXCHANGE, async (ctx, next) => {
  const { params, client } = ctx.oidc;
  if (params.subject_token_type !== 'urn:ietf:params:oauth:token-type:jwt'
      && params.subject_token_type !== 'urn:ietf:params:oauth:token-type:access_token') {
    throw new errors.InvalidRequest('unsupported subject_token_type');
  }
  let claims;
  try {
    ({ payload: claims } = await jwtVerify(params.subject_token, subjectKeys, {
      audience: [issuer, ...(conf.subjectAudiences || [])],
    }));
  } catch (e) {
    throw new errors.InvalidGrant(`subject_token invalid: ${e.code || e.message}`);
  }
  // RFC 8693 section 4.1: a verified actor token becomes the `act` claim (same trusted keys).
  let actor;
  if (params.actor_token) {
    if (params.actor_token_type !== 'urn:ietf:params:oauth:token-type:jwt') {
      throw new errors.InvalidRequest('unsupported actor_token_type');
    }
    try {
      ({ payload: actor } = await jwtVerify(params.actor_token, subjectKeys, {
        audience: [issuer, ...(conf.subjectAudiences || [])],
      }));
    } catch (e) {
      throw new errors.InvalidGrant(`actor_token invalid: ${e.code || e.message}`);
    }
  }
  const resource = params.audience || params.resource || 'https://api.test';
  const scope = params.scope || undefined;
  ctx.state.exchange = { exchanged_sub: claims.sub, ...(actor ? { exchanged_act: actor.sub } : {}) };
  const token = new provider.ClientCredentials({ client, scope });
  token.resourceServer = new provider.ResourceServer(resource, {
    scope: 'read write admin', audience: resource, accessTokenTTL: conf.ttl,
    accessTokenFormat: 'jwt', jwt: { sign: { alg: 'RS256' } },
  });
  ctx.oidc.entity('ClientCredentials', token);
  const value = await token.save();
  ctx.body = {
    access_token: value,
    issued_token_type: 'urn:ietf:params:oauth:token-type:access_token',
    token_type: 'Bearer',
    expires_in: token.expiration,
    scope,
  };
  await next();
}, ['subject_token', 'subject_token_type', 'actor_token', 'actor_token_type', 'audience',
  'resource', 'scope', 'requested_token_type']);

// Addition 2: counters and fault injection, in front of oidc-provider's own routes.
provider.use(async (ctx, next) => {
  if (ctx.path === '/_test/stats') {
    ctx.body = stats;
    return;
  }
  if (ctx.path === '/_test/fault') {
    fault = ctx.query.mode || null;
    ctx.body = { fault };
    return;
  }
  if (ctx.path === '/token' && ctx.method === 'POST') {
    stats.token += 1;
    if (fault === 'http500') { ctx.status = 500; ctx.body = { error: 'server_error' }; return; }
    if (fault === 'http400') { ctx.status = 400; ctx.body = { error: 'invalid_client' }; return; }
    if (fault === 'nonjson') { ctx.status = 200; ctx.type = 'text/html'; ctx.body = '<html>maintenance</html>'; return; }
    if (fault === 'noaccess') { ctx.status = 200; ctx.body = { token_type: 'Bearer', expires_in: 60 }; return; }
    if (fault === 'slow') { await new Promise((r) => { setTimeout(r, 30000); }); }
  }
  await next();
  if (ctx.path === '/token' && ctx.status === 200) {
    const g = ctx.oidc?.params?.grant_type || '?';
    stats.byGrant[g] = (stats.byGrant[g] || 0) + 1;
  }
});

// Server-side failures go to the log the tests keep (never token values: only messages).
provider.on('server_error', (ctx, err) => { process.stdout.write(`server_error: ${err.stack}\n`); });
provider.on('grant.error', (ctx, err) => { process.stdout.write(`grant.error: ${err.message} ${err.error_description || ''}\n`); });

provider.listen(conf.port, '127.0.0.1', () => {
  process.stdout.write(`listening ${issuer}\n`);
});
