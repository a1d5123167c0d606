// aoai-lb on Azure Container Apps, in front of one or more EXISTING Azure
// OpenAI resources.
//
// Creates, in the target resource group:
//   - a Log Analytics workspace receiving the environment's console and
//     system logs (and the Redis cache's diagnostics when one is created);
//   - a Container Apps environment and the gateway's container app: public
//     ingress on 8000, the admin port 8001 reachable only inside the
//     environment, liveness /healthz and readiness /readyz probes, a
//     termination grace period above the gateway's drain, an HTTP scale rule;
//   - a user-assigned managed identity for the app;
//   - "Cognitive Services OpenAI User" for that identity on EACH Azure OpenAI
//     resource listed in `openAiAccounts` (scope: the account, never its
//     resource group), in whatever resource group and subscription it lives;
//   - optionally Azure Cache for Redis, wired into the gateway document's
//     `redis` block.
//
// Secrets reach the container only as Container Apps secrets referenced by
// `secretRef`, either given at deployment time (secure parameters) or as Key
// Vault references resolved by the platform with the app's identity.
//
// Deploy (see README.md, "Deploy to Azure"):
//   az deployment group create -g <rg> -f deploy/main.bicep \
//     -p deploy/main.parameters.json -p instances=@instances.json -p apiKey=...
targetScope = 'resourceGroup'

// ---- parameters ------------------------------------------------------------

@description('Base name of every resource (container app, environment, identity, workspace).')
@minLength(2)
@maxLength(24)
param name string = 'aoai-lb'

@description('Azure region of the new resources. The Azure OpenAI resources may be anywhere.')
param location string = resourceGroup().location

@description('Container image of the gateway, e.g. myregistry.azurecr.io/aoai-lb:1.0.0.')
@minLength(1)
param image string

@description('Name of an existing Azure Container Registry holding the image, pulled with the managed identity (AcrPull is granted on it). Empty: the image is public.')
param containerRegistryName string = ''

@description('Resource group of that registry.')
param containerRegistryResourceGroup string = resourceGroup().name

@description('The existing Azure OpenAI resources the gateway fronts: [{ "name": "...", "resourceGroup": "...", "subscriptionId": "..." }]. resourceGroup and subscriptionId default to the deployment\'s own. The identity gets "Cognitive Services OpenAI User" on each.')
@minLength(1)
param openAiAccounts array

@description('The gateway document (OPENAI_INSTANCES, see docs/configuration.md) as an object. Leave empty when instancesKeyVaultSecretUri is given.')
@secure()
param instances object = {}

@description('Key Vault secret URI holding the gateway document instead of `instances`, e.g. https://myvault.vault.azure.net/secrets/aoai-lb-instances (no version: the app follows the latest).')
param instancesKeyVaultSecretUri string = ''

@description('The key clients send (API_KEY). Leave empty when apiKeyKeyVaultSecretUri is given.')
@secure()
param apiKey string = ''

@description('Key Vault secret URI holding the client key instead of `apiKey`.')
param apiKeyKeyVaultSecretUri string = ''

@description('Name of the key vault behind the secret URIs; the identity gets "Key Vault Secrets User" on it. Empty: grant it yourself before deploying.')
param keyVaultName string = ''

@description('Resource group of that key vault.')
param keyVaultResourceGroup string = resourceGroup().name

@description('vCPU per replica.')
@allowed([
  '0.5'
  '1.0'
  '2.0'
  '4.0'
])
param cpu string = '1.0'

@description('Memory per replica; must match the vCPU (2 GiB per vCPU on the Consumption profile).')
@allowed([
  '1Gi'
  '2Gi'
  '4Gi'
  '8Gi'
])
param memory string = '2Gi'

@description('Replicas kept running. At least 1: cooldown state is per replica and scale-to-zero would lose it and add a cold start.')
@minValue(1)
@maxValue(300)
param minReplicas int = 1

@description('Upper bound for the HTTP scale rule.')
@minValue(1)
@maxValue(300)
param maxReplicas int = 5

@description('HTTP scale rule: concurrent requests per replica before another replica is added. An open stream counts for its whole life, so keep it high.')
@minValue(1)
param concurrentRequestsPerReplica int = 300

@description('Seconds between SIGTERM and SIGKILL. Must stay above the gateway\'s drain: server.drain_delay_ms (1 s) + server.shutdown_grace_ms (30 s) by default.')
@minValue(1)
@maxValue(600)
param terminationGracePeriodSeconds int = 45

@description('Log Analytics retention in days.')
@minValue(30)
@maxValue(730)
param logRetentionDays int = 30

@description('Create an Azure Cache for Redis and put its `redis` block into the gateway document (with instancesKeyVaultSecretUri, add the block to the vault document yourself).')
param deployRedis bool = false

@description('SKU of that cache.')
@allowed([
  'Basic'
  'Standard'
  'Premium'
])
param redisSku string = 'Standard'

@description('Capacity of that cache (C0..C6 for Basic/Standard, P1..P5 for Premium).')
@minValue(0)
@maxValue(6)
param redisCapacity int = 1

@description('OTLP endpoint for traces (OTEL_EXPORTER_OTLP_ENDPOINT). Empty: tracing stays off.')
param otelExporterEndpoint string = ''

@description('OTLP protocol (OTEL_EXPORTER_OTLP_PROTOCOL). The Container Apps managed agent speaks grpc only.')
@allowed([
  'grpc'
  'http/protobuf'
])
param otelExporterProtocol string = 'grpc'

@description('Tags on every new resource.')
param tags object = {}

// ---- names and derived values -----------------------------------------------

var suffix = uniqueString(resourceGroup().id, name)
var publicPort = 8000
var adminPort = 8001

var registryServer = '${containerRegistryName}${environment().suffixes.acrLoginServer}'
var useRegistry = !empty(containerRegistryName)
var useKeyVault = !empty(keyVaultName)

// ---- identity and logs --------------------------------------------------------

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-${name}'
  location: location
  tags: tags
}

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: 'log-${name}-${suffix}'
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: logRetentionDays
  }
}

// ---- role assignments (each on the resource itself) ---------------------------

module openAiRoles 'modules/openai-user-role.bicep' = [for account in openAiAccounts: {
  name: 'openai-user-${uniqueString(name, string(account))}'
  scope: resourceGroup(contains(account, 'subscriptionId') ? account.subscriptionId : subscription().subscriptionId, contains(account, 'resourceGroup') ? account.resourceGroup : resourceGroup().name)
  params: {
    accountName: account.name
    principalId: identity.properties.principalId
  }
}]

module keyVaultRole 'modules/keyvault-secrets-user-role.bicep' = if (useKeyVault) {
  name: 'kv-secrets-user-${uniqueString(name, keyVaultName)}'
  scope: resourceGroup(keyVaultResourceGroup)
  params: {
    vaultName: keyVaultName
    principalId: identity.properties.principalId
  }
}

module acrPullRole 'modules/acr-pull-role.bicep' = if (useRegistry) {
  name: 'acr-pull-${uniqueString(name, containerRegistryName)}'
  scope: resourceGroup(containerRegistryResourceGroup)
  params: {
    registryName: containerRegistryName
    principalId: identity.properties.principalId
  }
}

// ---- optional Redis -------------------------------------------------------------

resource redis 'Microsoft.Cache/redis@2024-11-01' = if (deployRedis) {
  name: 'redis-${name}-${suffix}'
  location: location
  tags: tags
  properties: {
    sku: {
      name: redisSku
      family: redisSku == 'Premium' ? 'P' : 'C'
      capacity: redisCapacity
    }
    enableNonSslPort: false
    minimumTlsVersion: '1.2'
    publicNetworkAccess: 'Enabled'
  }
}

resource redisDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = if (deployRedis) {
  name: 'to-log-analytics'
  scope: redis
  properties: {
    workspaceId: logs.id
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

// The `redis` block the gateway reads from its document (docs/configuration.md):
// TLS on 6380, the access key kept out of the URL, keys prefixed per deployment.
var redisBlock = deployRedis ? {
  redis: {
    url: 'rediss://${redis.properties.hostName}:6380/0'
    password: redis.listKeys().primaryKey
    key_prefix: 'aoai-lb:v1:${name}:'
  }
} : {}

// ---- secrets and environment ------------------------------------------------------

var instancesSecret = empty(instancesKeyVaultSecretUri) ? {
  name: 'openai-instances'
  value: string(union(instances, redisBlock))
} : {
  name: 'openai-instances'
  keyVaultUrl: instancesKeyVaultSecretUri
  identity: identity.id
}

var apiKeySecret = empty(apiKeyKeyVaultSecretUri) ? {
  name: 'api-key'
  value: apiKey
} : {
  name: 'api-key'
  keyVaultUrl: apiKeyKeyVaultSecretUri
  identity: identity.id
}

var baseEnv = [
  {
    name: 'OPENAI_INSTANCES'
    secretRef: 'openai-instances'
  }
  {
    name: 'API_KEY'
    secretRef: 'api-key'
  }
  {
    // For instances with "auth": {"type": "managed_identity"}: the
    // user-assigned identity to ask tokens for.
    name: 'AZURE_CLIENT_ID'
    value: identity.properties.clientId
  }
  {
    name: 'LOG_FORMAT'
    value: 'json'
  }
]

var otelEnv = empty(otelExporterEndpoint) ? [] : [
  {
    name: 'OTEL_EXPORTER_OTLP_ENDPOINT'
    value: otelExporterEndpoint
  }
  {
    name: 'OTEL_EXPORTER_OTLP_PROTOCOL'
    value: otelExporterProtocol
  }
  {
    name: 'OTEL_SERVICE_NAME'
    value: name
  }
]

// ---- environment and app ---------------------------------------------------------------

resource appEnvironment 'Microsoft.App/managedEnvironments@2025-01-01' = {
  name: 'cae-${name}'
  location: location
  tags: tags
  properties: {
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: logs.properties.customerId
        sharedKey: logs.listKeys().primarySharedKey
      }
    }
  }
}

resource app 'Microsoft.App/containerApps@2025-01-01' = {
  name: name
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    managedEnvironmentId: appEnvironment.id
    configuration: {
      activeRevisionsMode: 'Single'
      ingress: {
        external: true
        targetPort: publicPort
        transport: 'auto'
        allowInsecure: false
        // /metrics and /admin/*: reachable from inside the environment only.
        additionalPortMappings: [
          {
            external: false
            targetPort: adminPort
          }
        ]
      }
      registries: useRegistry ? [
        {
          server: registryServer
          identity: identity.id
        }
      ] : []
      secrets: [
        instancesSecret
        apiKeySecret
      ]
    }
    template: {
      terminationGracePeriodSeconds: terminationGracePeriodSeconds
      containers: [
        {
          name: 'aoai-lb'
          image: image
          resources: {
            cpu: json(cpu)
            memory: memory
          }
          env: concat(baseEnv, otelEnv)
          probes: [
            {
              type: 'Liveness'
              httpGet: {
                path: '/healthz'
                port: publicPort
              }
              initialDelaySeconds: 1
              periodSeconds: 10
              timeoutSeconds: 2
              failureThreshold: 3
            }
            {
              type: 'Readiness'
              httpGet: {
                path: '/readyz'
                port: publicPort
              }
              initialDelaySeconds: 1
              periodSeconds: 5
              timeoutSeconds: 2
              failureThreshold: 2
              successThreshold: 1
            }
          ]
        }
      ]
      scale: {
        minReplicas: minReplicas
        maxReplicas: maxReplicas
        rules: [
          {
            name: 'http-concurrency'
            http: {
              metadata: {
                concurrentRequests: string(concurrentRequestsPerReplica)
              }
            }
          }
        ]
      }
    }
  }
  // The roles must exist before the platform pulls the image and resolves
  // the Key Vault references with this identity.
  dependsOn: [
    openAiRoles
    keyVaultRole
    acrPullRole
  ]
}

// ---- outputs -------------------------------------------------------------------------------

@description('Public base URL of the gateway (point the SDKs here).')
output url string = 'https://${app.properties.configuration.ingress.fqdn}'

@description('Client id of the managed identity (AZURE_CLIENT_ID; "client_id" of a managed_identity instance).')
output identityClientId string = identity.properties.clientId

@description('Principal (object) id of the managed identity: the one to look for in the role assignments.')
output identityPrincipalId string = identity.properties.principalId

@description('One "Cognitive Services OpenAI User" assignment per Azure OpenAI resource.')
output openAiRoleAssignmentIds array = [for (account, i) in openAiAccounts: openAiRoles[i].outputs.roleAssignmentId]

@description('Host name of the Redis cache, empty when none was created.')
output redisHostName string = deployRedis ? redis.properties.hostName : ''

@description('Log Analytics workspace receiving the logs.')
output logAnalyticsWorkspaceId string = logs.id
