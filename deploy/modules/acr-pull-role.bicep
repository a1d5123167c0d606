// Grants "AcrPull" to one principal on ONE existing container registry, so the
// container app pulls the gateway image with its user-assigned identity
// instead of registry admin credentials.
targetScope = 'resourceGroup'

@description('Name of the existing container registry in this resource group.')
param registryName string

@description('Object (principal) id of the managed identity that receives the role.')
param principalId string

// Built-in role "AcrPull".
var acrPullRoleId = '7f951dde-4a6e-4c8b-b7e3-8f7e68ab5bd3'

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' existing = {
  name: registryName
}

resource assignment 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(registry.id, principalId, acrPullRoleId)
  scope: registry
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', acrPullRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

@description('Login server of the registry, for the container app registries block.')
output loginServer string = registry.properties.loginServer
